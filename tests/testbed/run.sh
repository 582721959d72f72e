#!/usr/bin/env bash
# Boot the qemu testbed once with host binaries and a guest script, and check the result line.
#
#   bash tests/testbed/run.sh [OPTIONS] [NAME=]BINARY...
#
# Each BINARY is copied (debug info stripped when `strip` is present) to /testbed/bin/NAME in the
# guest (NAME defaults to the file's name), which is on the guest's PATH. The guest script (default
# guest/tests.sh) becomes /testbed/guest.sh; /init runs it. Both go into a second, uncompressed
# cpio archive appended to the cached base initramfs (build it first with build-image.sh).
#
# Options:
#   --steps FILE         extra guest steps (sourced by tests.sh after its own); repeatable
#   --guest-script FILE  the guest script (default: tests/testbed/guest/tests.sh)
#   --env NAME=VALUE     exported to the guest script; repeatable
#   --timeout SECONDS    wall-clock limit for the whole boot (default 900)
#   --log FILE           the serial log (default: tests/testbed/cache/last-run.log)
#   --verbose            print the whole serial log, not only the summary
#
# Exit status 0 only when the guest printed `DMAPLANE-TESTBED-RESULT: pass`.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
CACHE="${TESTBED_CACHE:-$here/cache}"
GUEST_SCRIPT="$here/guest/tests.sh"
TIMEOUT=900
LOG="$CACHE/last-run.log"
VERBOSE=0
STEPS=()
ENVS=()
BINS=()

die() { echo "run.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS+=("${2:?--steps needs a file}"); shift 2 ;;
    --guest-script) GUEST_SCRIPT="${2:?--guest-script needs a file}"; shift 2 ;;
    --env) ENVS+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
    --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
    --log) LOG="${2:?--log needs a file}"; shift 2 ;;
    --verbose) VERBOSE=1; shift ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    --) shift; BINS+=("$@"); break ;;
    -*) die "unknown option $1" ;;
    *) BINS+=("$1"); shift ;;
  esac
done

for f in vmlinuz initrd.gz; do
  [ -f "$CACHE/$f" ] || die "$CACHE/$f is missing: run tests/testbed/build-image.sh first"
done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (apt-get install qemu-system-x86)"
command -v cpio >/dev/null || die "cpio is missing (apt-get install cpio)"
[ -r "$GUEST_SCRIPT" ] || die "no guest script $GUEST_SCRIPT"

stage="$(mktemp -d "${TMPDIR:-/tmp}/dmaplane-testbed.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/root/testbed/bin" "$stage/root/testbed/steps.d"

for b in "${BINS[@]}"; do
  if [[ "$b" == *=* ]]; then name="${b%%=*}"; path="${b#*=}"; else name="$(basename "$b")"; path="$b"; fi
  if ! [ -f "$path" ] || ! [ -x "$path" ]; then die "binary $path (for $name) does not exist or is not executable"; fi
  [[ "$name" =~ ^[A-Za-z0-9._+-]+$ ]] || die "bad guest name '$name' for $path"
  if command -v strip >/dev/null && strip --strip-debug -o "$stage/root/testbed/bin/$name" "$path" 2>/dev/null; then
    chmod 0755 "$stage/root/testbed/bin/$name"
  else
    install -m 0755 "$path" "$stage/root/testbed/bin/$name"
  fi
done
i=0
for s in "${STEPS[@]}"; do
  [ -f "$s" ] || die "no steps file $s"
  i=$((i + 1))
  install -m 0644 "$s" "$stage/root/testbed/steps.d/$(printf '%02d' "$i")-$(basename "$s")"
done
{
  echo '#!/bin/sh'
  for e in "${ENVS[@]}"; do
    [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env $e"
    printf 'export %s=%q\n' "${e%%=*}" "${e#*=}"
  done
  cat "$GUEST_SCRIPT"
} >"$stage/root/testbed/guest.sh"
chmod 0755 "$stage/root/testbed/guest.sh"

# Base image (gzip, padded to 512 bytes) + an uncompressed archive: the kernel unpacks both.
(cd "$stage/root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) >"$stage/extra.cpio"
cat "$CACHE/initrd.gz" "$stage/extra.cpio" >"$stage/initrd"
echo "run.sh: guest archive $(du -h "$stage/extra.cpio" | cut -f1) (${#BINS[@]} binaries, ${#STEPS[@]} steps files); booting $(cat "$CACHE/kernel-version" 2>/dev/null) under qemu TCG (limit ${TIMEOUT}s)"

mkdir -p "$(dirname "$LOG")"
t0=$SECONDS
set +e
timeout -k 10 "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 1024 \
  -nographic -no-reboot \
  -kernel "$CACHE/vmlinuz" -initrd "$stage/initrd" \
  -append 'console=ttyS0 panic=-1 quiet' \
  -nic user,model=virtio-net-pci </dev/null >"$LOG" 2>&1
qrc=$?
set -e
wall=$((SECONDS - t0))

# The serial log without carriage returns and terminal escapes (SeaBIOS clears the screen).
clean_log() { sed -e 's/\r//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' "$LOG"; }
result="$(clean_log | grep -a -o '^DMAPLANE-TESTBED-RESULT: .*' | tail -n1 || true)"
summary() { clean_log | grep -a -E '^(== |testbed: |DMAPLANE-TESTBED-RESULT: )' || true; }

if [ "$VERBOSE" = 1 ]; then
  clean_log
else
  summary
fi
if [ "$result" = "DMAPLANE-TESTBED-RESULT: pass" ]; then
  echo "run.sh: pass in ${wall}s (serial log: $LOG)"
  exit 0
fi

echo "run.sh: FAILED after ${wall}s (qemu exit $qrc${result:+; $result}); serial log: $LOG" >&2
if [ "$VERBOSE" = 0 ]; then
  if [ -z "$result" ]; then
    [ "$qrc" = 124 ] && echo "run.sh: no result line: qemu was killed after ${TIMEOUT}s" >&2
    echo "---- last 80 lines of the serial log ----" >&2
    clean_log | tail -n 80 >&2
  else
    # The output of each failed step (its last 150 lines), then the end of the log.
    clean_log | awk '
      /^== step [^:]*: begin/ { n = 0; delete buf }
      { buf[++n] = $0 }
      /^== step [^:]*: FAIL/ {
        print "---- " substr($0, 4) " ----"
        for (i = (n > 150 ? n - 149 : 1); i <= n; i++) print buf[i]
      }' >&2
    echo "---- end of the serial log ----" >&2
    clean_log | tail -n 15 >&2
  fi
fi
exit 1
