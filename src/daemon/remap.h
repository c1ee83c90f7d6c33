/* The remap thread's side of the writer (remap.c). */
#ifndef QS_DAEMON_REMAP_H
#define QS_DAEMON_REMAP_H

#include "qcow2_rw.h"

/* The writer's operations (ops, as the engine gets them) made to end the
 * remap thread's idle sleep when they write a new cluster: its metadata is
 * written back a flush_interval later, as when the thread was awake. The
 * engine calls them under the engine lock. */
void daemon_remap_wake_on_write(struct qcow2_rw_ops *ops);

#endif
