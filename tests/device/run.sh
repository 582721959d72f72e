#!/usr/bin/env bash
# The CUDA checks for a machine with a real NVIDIA GPU, on binaries tests/device/prepare.sh built
# (in target/device/). Every log goes to $OUT (or target/device/out); the summary says what ran,
# what passed and the numbers. Nothing here changes the GPU's settings.
set -uo pipefail
cd "$(dirname "$0")/../.."
dev=target/device
out=${OUT:-$dev/out}
mkdir -p "$out"
fail=0
step() {
  local name=$1
  shift
  local t0=$SECONDS
  if timeout "${STEP_LIMIT:-240}" "$@" >"$out/$name.log" 2>&1; then
    echo "pass  $name ($((SECONDS - t0)) s)" | tee -a "$out/summary.txt"
  else
    echo "FAIL  $name (exit $?, $((SECONDS - t0)) s): see $name.log" | tee -a "$out/summary.txt"
    tail -20 "$out/$name.log"
    fail=1
  fi
}
: >"$out/summary.txt"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1 || true; uname -r; } | tee "$out/machine.txt"
step doctor "$dev/dmaplane" doctor
# The GPU tests must find a device here: a skip would be a pass that checked nothing. The fake
# driver run is skipped: it needs a C compiler, and CI runs it.
step gpu-cuda-tests env DMAPLANE_CUDA_TESTS_REQUIRE_GPU=1 "$dev/gpu-cuda-tests" --test-threads=1 --nocapture --skip fake_driver_runs_every_gpu_test
step lend-cuda env DMAPLANE_REQUIRE_CUDA=1 "$dev/lend-cuda-tests" --exact lent_cuda_memory_is_used_in_place_and_given_back_after_its_free --nocapture
step bench-p2p "$dev/dmaplane" bench p2p
grep -E "^test result|skipping" "$out/gpu-cuda-tests.log" | tee -a "$out/summary.txt"
exit $fail
