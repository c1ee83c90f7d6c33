#!/bin/sh
# Automake test: `man -l` renders every man page (each man/*.adoc, built by
# asciidoctor: man/Makemodule.am) without a warning. Without asciidoctor's
# pages or man this skips (77).
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
builddir=${top_builddir:-$top}
command -v man >/dev/null || { echo "SKIP: no man"; exit 77; }
ls "$builddir"/man/*.[1-8] >/dev/null 2>&1 || { echo "SKIP: no built man pages (asciidoctor missing?)"; exit 77; }
rc=0
for src in "$top"/man/*.adoc; do
	name=$(basename "$src" .adoc)
	case $name in
	*.[1-8]) page=$builddir/man/$name ;;
	*) page=$(ls "$builddir/man/$name".[1-8] 2>/dev/null | head -n 1) ;;
	esac
	if [ -z "$page" ] || [ ! -f "$page" ]; then
		echo "FAIL: $(basename "$src"): no page built"
		rc=1
		continue
	fi
	err=$(MANWIDTH=80 man -l "$page" 2>&1 >/dev/null)
	lines=$(MANWIDTH=80 man -l "$page" 2>/dev/null | wc -l)
	if [ -n "$err" ] || [ "$lines" -lt 20 ]; then
		echo "FAIL: man -l $(basename "$page"): $lines lines${err:+, $err}"
		rc=1
	else
		echo "PASS: man -l $(basename "$page") ($lines lines)"
	fi
done
exit $rc
