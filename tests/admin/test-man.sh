#!/bin/bash
# Automake test: `man -l` renders every man page (each man/*.adoc, built by
# asciidoctor: man/Makemodule.am) without a warning. Without asciidoctor's
# pages or man this skips (77).
me=test-man
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
need man
ls "$builddir"/man/*.[1-8] >/dev/null 2>&1 || skip_test "no built man pages (asciidoctor missing?)"
for src in "$top"/man/*.adoc; do
	name=$(basename "$src" .adoc)
	case $name in
	*.[1-8]) page=$builddir/man/$name ;;
	*) page=$(ls "$builddir/man/$name".[1-8] 2>/dev/null | head -n 1) ;;
	esac
	if [ -z "$page" ] || [ ! -f "$page" ]; then
		fail "$(basename "$src"): no page built"
		continue
	fi
	err=$(MANWIDTH=80 man -l "$page" 2>&1 >/dev/null)
	lines=$(MANWIDTH=80 man -l "$page" 2>/dev/null | wc -l)
	if [ -n "$err" ] || [ "$lines" -lt 20 ]; then
		fail "man -l $(basename "$page"): $lines lines${err:+, $err}"
	else
		pass "man -l $(basename "$page") ($lines lines)"
	fi
done
summary
