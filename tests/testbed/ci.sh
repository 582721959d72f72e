#!/usr/bin/env bash
# The qemu testbed's one entry point (CI runs it from .ci/run): build the project binaries the
# guest runs, build or reuse the cached image, boot it, and fail unless the guest says pass.
#
#   bash tests/testbed/ci.sh
#
# Installs nothing: the host needs qemu-system-x86, cpio, xz-utils (and apt, dpkg, gzip), which
# .ci/run installs. Environment:
#   CARGO            the cargo command (default `cargo`; e.g. CARGO="flock /tmp/cargo.lock cargo")
#   TESTBED_STEPS    more guest steps files, space separated (besides tests/testbed/steps.d/*.steps)
#   TESTBED_TIMEOUT  limit for the boot in seconds (default 600)
set -euo pipefail
cd "$(dirname "$0")/../.."
here=tests/testbed
read -r -a CARGO_CMD <<<"${CARGO:-cargo}"

# ---- what goes into the guest ----------------------------------------------------------------
# Test binaries: "GUEST_NAME PACKAGE TEST_TARGET [CARGO ARGS...]". The guest finds each on its
# PATH as GUEST_NAME; guest/tests.sh (or a steps file) runs it.
TEST_BINS=(
  "core-dmabuf dmaplane-core dmabuf"
  "rdma-verbs dmaplane-rdma verbs --features verbs"
  "dmaplane-verbs dmaplane verbs --features verbs"
  "storage-faults dmaplane-storage faults"
  "dmaplane-file dmaplane file"
)
# Program binaries: "GUEST_NAME PACKAGE BIN_TARGET [CARGO ARGS...]".
PROGRAM_BINS=(
  "dmaplane dmaplane-tools dmaplane --features verbs"
)
# Extra guest steps: every tests/testbed/steps.d/*.steps file, then $TESTBED_STEPS.
STEPS=()
for f in "$here"/steps.d/*.steps; do [ -f "$f" ] && STEPS+=("$f"); done
for f in ${TESTBED_STEPS:-}; do STEPS+=("$f"); done
# ----------------------------------------------------------------------------------------------

t0=$SECONDS
say() { printf '[testbed ci %3ds] %s\n' "$((SECONDS - t0))" "$*"; }

# Build one cargo target and print the path of the executable it produced.
#   artifact KIND GUEST_NAME PACKAGE TARGET [CARGO ARGS...]   (KIND: test | bin)
artifact() {
  local kind="$1" guest="$2" pkg="$3" target="$4"
  shift 4
  local -a build
  if [ "$kind" = test ]; then
    build=(test --no-run -p "$pkg" --test "$target")
  else
    build=(build -p "$pkg" --bin "$target")
  fi
  local json exe
  json="$("${CARGO_CMD[@]}" "${build[@]}" "$@" --message-format=json-render-diagnostics)" ||
    { echo "ci.sh: cargo ${build[*]} $* failed" >&2; return 1; }
  exe="$(grep '"reason":"compiler-artifact"' <<<"$json" |
    grep -F "\"kind\":[\"$kind\"]" | grep -F "\"name\":\"$target\"" |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)"
  if [ -z "$exe" ] || ! [ -x "$exe" ]; then
    echo "ci.sh: no executable for $kind target $target of $pkg" >&2
    return 1
  fi
  printf '%s=%s\n' "$guest" "$exe"
}

say "building the guest's binaries"
BINS=()
for spec in "${TEST_BINS[@]}"; do
  read -r -a a <<<"$spec"
  BINS+=("$(artifact test "${a[@]}")")
done
for spec in "${PROGRAM_BINS[@]}"; do
  read -r -a a <<<"$spec"
  BINS+=("$(artifact bin "${a[@]}")")
done
# The fake CUDA driver (for `stress revoke --exporter cuda` on rxe0), as a library on the guest's
# /testbed/bin.
fake="$(mktemp -d)/libcuda.so.1"
"${CC:-cc}" -shared -fPIC -O1 -pthread -o "$fake" gpu/src/cuda/fake_libcuda.c ||
  { echo "ci.sh: building the fake CUDA driver failed" >&2; exit 1; }
BINS+=("libcuda.so.1=$fake")
printf '  %s\n' "${BINS[@]}"

say "building the image (cached in ${TESTBED_CACHE:-$here/cache})"
bash "$here/build-image.sh"

say "booting"
args=(--timeout "${TESTBED_TIMEOUT:-600}")
for s in "${STEPS[@]}"; do args+=(--steps "$s"); done
if bash "$here/run.sh" "${args[@]}" "${BINS[@]}"; then
  say "testbed: pass"
else
  say "testbed: FAILED"
  exit 1
fi
