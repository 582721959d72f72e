#!/usr/bin/env bash
# Build, on this machine, what tests/device/run.sh runs on a machine with a real NVIDIA GPU (the
# device machine has no toolchain to rely on): the CUDA backend's tests and the CLI, copied into
# target/device/ (ignored by git; carry it: `run` with carry ["target/device"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/device
rm -rf "$out" && mkdir -p "$out"
# A test binary: the path cargo built it at, from its JSON messages.
test_bin() { # package test-target copy-as
  local bin
  bin=$(cargo test -p "$1" --release --test "$2" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$2")
  [ -x "$bin" ] || { echo "prepare: no test binary $1/$2 was built" >&2; exit 1; }
  cp "$bin" "$out/$3"
}
# The CUDA backend's tests, and CUDA memory a caller allocated lent to agents on TCP NICs.
test_bin dmaplane-gpu cuda gpu-cuda-tests
test_bin dmaplane lend_cuda lend-cuda-tests
cargo build --release -p dmaplane-tools --bin dmaplane
cp target/release/dmaplane "$out/dmaplane"
strip "$out"/* 2>/dev/null || true
cp tests/device/run.sh "$out/"
du -sh "$out"/*
echo "prepare: done; on the device machine: bash target/device/run.sh"
