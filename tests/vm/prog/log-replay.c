/* VM test tool: the log of a dm-log-writes device (tests/vm/guest/logwrites.sh).
 *
 *   log-replay list LOGDEV
 *       One line per entry: INDEX FLAGS SECTOR NR_SECTORS [MARK]. INDEX
 *       counts from 0; FLAGS are letters, '-' when none: F flush, U FUA,
 *       D discard, M mark, m metadata; sectors are in the log's sector size.
 *   log-replay replay LOGDEV DEV FROM TO
 *       Writes entries FROM .. TO-1 to DEV in the log's order (a discard
 *       writes zeros), then fsyncs DEV: DEV holding the device's content
 *       after entry FROM-1 then holds it after entry TO-1.
 *
 * The log (drivers/md/dm-log-writes.c, version 1), little endian: the super
 * block in the first sector {u64 magic, u64 version, u64 nr_entries,
 * u32 sectorsize}; from the second sector on, each entry is one sector
 * {u64 sector, u64 nr_sectors, u64 flags, u64 data_len} (a mark: its name,
 * data_len bytes, follows in that sector), then, unless a discard,
 * nr_sectors sectors of the data written. Exit: 0, 1 on an error, 2 on bad
 * usage. */
#include <endian.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sysutil.h"

#define LOG_MAGIC 0x6a736677736872ULL
#define LOG_VERSION 1
#define LOG_FLUSH (1 << 0)
#define LOG_FUA (1 << 1)
#define LOG_DISCARD (1 << 2)
#define LOG_MARK (1 << 3)
#define LOG_METADATA (1 << 4)
#define ENTRY_HEADER_SIZE 32

struct log {
	int fd;
	uint64_t nr_entries;
	uint32_t sectorsize;
	uint64_t pos;	/* byte offset of the next entry */
	uint64_t index;	/* its number */
	uint8_t *block;	/* one sector */
};

struct entry {
	uint64_t sector, nr_sectors, flags;
	char mark[512];
	uint64_t data_pos;	/* byte offset of its data in the log */
};

static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
	return le64toh(v);
}

static int log_open(struct log *lg, const char *path)
{
	uint8_t super[32];

	lg->fd = open(path, O_RDONLY);
	if (lg->fd < 0 || fd_pread_all(lg->fd, super, sizeof(super), 0)) {
		fprintf(stderr, "log-replay: %s: cannot read the super block\n", path);
		return -1;
	}
	if (get_le64(super) != LOG_MAGIC || get_le64(super + 8) != LOG_VERSION) {
		fprintf(stderr, "log-replay: %s: not a dm-log-writes log (version 1)\n", path);
		return -1;
	}
	lg->nr_entries = get_le64(super + 16);
	memcpy(&lg->sectorsize, super + 24, sizeof(lg->sectorsize));
	lg->sectorsize = le32toh(lg->sectorsize);
	if (lg->sectorsize < 512 || lg->sectorsize > 65536 || (lg->sectorsize & (lg->sectorsize - 1))) {
		fprintf(stderr, "log-replay: %s: sector size %u\n", path, lg->sectorsize);
		return -1;
	}
	lg->block = malloc(lg->sectorsize);
	lg->pos = lg->sectorsize;
	lg->index = 0;
	return lg->block ? 0 : -1;
}

/* the next entry into e; 1 at the end of the log, -1 on an error */
static int log_next(struct log *lg, struct entry *e)
{
	uint64_t data_len;

	if (lg->index >= lg->nr_entries)
		return 1;
	if (fd_pread_all(lg->fd, lg->block, lg->sectorsize, lg->pos)) {
		fprintf(stderr, "log-replay: entry %" PRIu64 ": cannot read it\n", lg->index);
		return -1;
	}
	e->sector = get_le64(lg->block);
	e->nr_sectors = get_le64(lg->block + 8);
	e->flags = get_le64(lg->block + 16);
	data_len = get_le64(lg->block + 24);
	e->mark[0] = 0;
	if (e->flags & LOG_MARK) {
		if (data_len > lg->sectorsize - ENTRY_HEADER_SIZE || data_len >= sizeof(e->mark)) {
			fprintf(stderr, "log-replay: entry %" PRIu64 ": mark of %" PRIu64 " bytes\n", lg->index,
				data_len);
			return -1;
		}
		memcpy(e->mark, lg->block + ENTRY_HEADER_SIZE, data_len);
		e->mark[data_len] = 0;
	}
	if (e->nr_sectors > (UINT64_MAX - lg->pos) / lg->sectorsize - 1) {
		fprintf(stderr, "log-replay: entry %" PRIu64 ": %" PRIu64 " sectors\n", lg->index, e->nr_sectors);
		return -1;
	}
	e->data_pos = lg->pos + lg->sectorsize;
	lg->pos = e->data_pos;
	if (!(e->flags & LOG_DISCARD))
		lg->pos += e->nr_sectors * lg->sectorsize;
	lg->index++;
	return 0;
}

static int do_list(const char *path)
{
	struct log lg;
	struct entry e;
	int r;

	if (log_open(&lg, path))
		return 1;
	while ((r = log_next(&lg, &e)) == 0) {
		char f[8], *p = f;

		if (e.flags & LOG_FLUSH)
			*p++ = 'F';
		if (e.flags & LOG_FUA)
			*p++ = 'U';
		if (e.flags & LOG_DISCARD)
			*p++ = 'D';
		if (e.flags & LOG_MARK)
			*p++ = 'M';
		if (e.flags & LOG_METADATA)
			*p++ = 'm';
		if (p == f)
			*p++ = '-';
		*p = 0;
		printf("%" PRIu64 " %s %" PRIu64 " %" PRIu64 "%s%s\n", lg.index - 1, f, e.sector, e.nr_sectors,
		       e.mark[0] ? " " : "", e.mark);
	}
	return r < 0;
}

static int do_replay(const char *path, const char *dev_path, uint64_t from, uint64_t to)
{
	size_t bufsize = 1 << 20;
	uint8_t *buf = malloc(bufsize);
	struct log lg;
	struct entry e;
	int dev, r;

	if (!buf || log_open(&lg, path))
		return 1;
	dev = open(dev_path, O_WRONLY);
	if (dev < 0) {
		perror(dev_path);
		return 1;
	}
	while (lg.index < to && log_next(&lg, &e) == 0) {
		uint64_t left = e.nr_sectors * lg.sectorsize, src = e.data_pos, dst = e.sector * lg.sectorsize;

		if (lg.index - 1 < from)
			continue;
		if (e.flags & LOG_DISCARD)
			memset(buf, 0, bufsize);
		while (left) {
			size_t n = left < bufsize ? (size_t)left : bufsize;

			if (!(e.flags & LOG_DISCARD) && fd_pread_all(lg.fd, buf, n, src)) {
				fprintf(stderr, "log-replay: entry %" PRIu64 ": cannot read its data\n", lg.index - 1);
				return 1;
			}
			r = fd_pwrite_all(dev, buf, n, dst);
			if (r) {
				fprintf(stderr, "log-replay: entry %" PRIu64 ": %s: %s\n", lg.index - 1, dev_path,
					strerror(-r));
				return 1;
			}
			left -= n;
			src += n;
			dst += n;
		}
	}
	if (lg.index < to) {
		fprintf(stderr, "log-replay: the log has %" PRIu64 " entries, not %" PRIu64 "\n", lg.nr_entries, to);
		return 1;
	}
	if (fsync(dev)) {
		perror(dev_path);
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "list"))
		return do_list(argv[2]);
	if (argc == 6 && !strcmp(argv[1], "replay"))
		return do_replay(argv[2], argv[3], strtoull(argv[4], NULL, 0), strtoull(argv[5], NULL, 0));
	fprintf(stderr, "usage: log-replay list LOGDEV | log-replay replay LOGDEV DEV FROM TO\n");
	return 2;
}
