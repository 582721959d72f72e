"""The Python package's cost over the Rust library, measured side by side in one run on the
built-in simulated testbed (reference loops run in Rust on the same agents, in the same
process: `dmaplane._dmaplane.rust_transfer_loop` / `rust_prepared_loop`).

    python python/bench.py [--n 20000] [--rounds 5]

Reports, each as a median of alternating runs:
- small transfers (64 B WRITE, posted and waited for in turn): µs per transfer from Python
  and from Rust, and the difference (target: at most 2 µs), 8 × `--rounds` blocks of
  `--n` / 8 in turn;
- 64 MiB WRITEs: GB/s from Python and from Rust, and the ratio (target: at least 98 %),
  `--big-reps` × `--rounds` pairs of one transfer each;
- NIXL's loop (make_prepped_xfer + transfer + check_xfer_state until DONE) through
  dmaplane.nixl, against the same loop on the native API (prepare_read + post + status) and
  in Rust (target: at most 3 µs over the native one), 8 × `--rounds` short blocks of each in
  turn.
"""

import os
import sys

# python/ holds the package's sources (without its native module): use the installed package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import json
import statistics
import time

import numpy as np

import dmaplane
from dmaplane import _dmaplane as native
from dmaplane.nixl._api import nixl_agent, nixl_agent_config

BLOCK = 4096


def median_of(rounds, fn):
    return statistics.median(fn() for _ in range(rounds))


def small(a, peer, rs, remote, n, rounds):
    """µs per 64 B WRITE posted and waited for, from Python and from Rust: 8 × `rounds` short
    blocks of each (n / 8 transfers), in turn and in alternating order; the medians."""
    local, rem = rs[0:64], remote[0:64]

    def py_loop(k):
        t0 = time.perf_counter()
        for _ in range(k):
            a.write(peer, local, rem).wait()
        return (time.perf_counter() - t0) / k * 1e6

    def rust_loop(k):
        return native.rust_transfer_loop(a, peer, local, rem, k) / k * 1e6

    k = max(1, n // 8)
    py_loop(k), rust_loop(k)  # warm
    py_us, rust_us = [], []
    for i in range(rounds * 8):
        loops = [(py_loop, py_us), (rust_loop, rust_us)]
        for fn, out in loops if i % 2 == 0 else loops[::-1]:
            out.append(fn(k))
    return statistics.median(py_us), statistics.median(rust_us)


def big(a, peer, rs, remote, size, reps, rounds):
    """Throughput of one transfer of `size` from Python and from Rust, taken in pairs (one
    each, back to back) so that both see the same machine; the medians of reps × rounds
    pairs. A 2-core machine's scheduling noise is milliseconds: pairing keeps it out of the
    ratio."""
    local, rem = rs[0:size], remote[0:size]

    def py_once():
        t0 = time.perf_counter()
        a.write(peer, local, rem).wait()
        return time.perf_counter() - t0

    def rust_once():
        return native.rust_transfer_loop(a, peer, local, rem, 1)

    py_once(), rust_once()
    py_s, rust_s = [], []
    for i in range(reps * rounds):
        # Alternate which goes first, so neither always follows the other.
        if i % 2:
            rust_s.append(rust_once())
            py_s.append(py_once())
        else:
            py_s.append(py_once())
            rust_s.append(rust_once())
    return size / statistics.median(py_s) / 1e9, size / statistics.median(rust_s) / 1e9


def nixl_loop(n, rounds):
    tb = dmaplane.Testbed.builtin()
    conf = lambda nic: nixl_agent_config(dmaplane_backend="sim", testbed=tb, nics=[nic])
    reader, owner = nixl_agent("nixl-reader", conf("nic0")), nixl_agent("nixl-owner", conf("nic1"))
    src = np.ones(64 * BLOCK, dtype=np.uint8)
    dst = np.zeros(64 * BLOCK, dtype=np.uint8)
    owner.register_memory([src])
    reader.register_memory([dst])
    name = reader.add_remote_agent(owner.get_agent_metadata())
    sb, db = src.__array_interface__["data"][0], dst.__array_interface__["data"][0]
    local = reader.prep_xfer_dlist("NIXL_INIT_AGENT", [(db + i * BLOCK, BLOCK, 0) for i in range(64)], "DRAM")
    remote = reader.prep_xfer_dlist(name, [(sb + i * BLOCK, BLOCK, 0) for i in range(64)], "DRAM")
    ids = np.array([3], dtype=np.int64)

    def facade(k):
        t0 = time.perf_counter()
        for _ in range(k):
            h = reader.make_prepped_xfer("READ", local, ids, remote, ids)
            reader.transfer(h)
            while reader.check_xfer_state(h) != "DONE":
                pass
        return (time.perf_counter() - t0) / k * 1e6

    peer = reader.native.peer("nixl-owner")
    lb, rb = local._blocks, remote._blocks

    def native_py(k):
        t0 = time.perf_counter()
        for _ in range(k):
            t = reader.native.prepare_read(peer, lb, ids, rb, ids).post()
            while t.status != "done":
                pass
        return (time.perf_counter() - t0) / k * 1e6

    prepared = reader.native.prepare_read(peer, lb, ids, rb, ids)

    def rust(k):
        return native.rust_prepared_loop(prepared, k) / k * 1e6

    # Short blocks of each, in turn and in alternating order, so that all three see the same
    # machine (a 2-core machine's scheduling drifts over a long block); medians of the blocks.
    k = max(1, n // 8)
    facade(k), native_py(k), rust(k)
    f, p, r = [], [], []
    for i in range(rounds * 8):
        loops = [(facade, f), (native_py, p), (rust, r)]
        for fn, out in loops if i % 2 == 0 else loops[::-1]:
            out.append(fn(k))
    reader.native.close()
    owner.native.close()
    return statistics.median(f), statistics.median(p), statistics.median(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="small transfers per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--big-mib", type=int, default=64)
    ap.add_argument("--big-reps", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    size = args.big_mib << 20
    tb = dmaplane.Testbed.builtin()
    with dmaplane.Agent("bench-a", nics=["nic0"], testbed=tb) as a, dmaplane.Agent(
        "bench-b", nics=["nic1"], testbed=tb
    ) as b:
        src = np.ones(size, dtype=np.uint8)
        dst = np.zeros(size, dtype=np.uint8)
        rs = a.register(src)
        b.register(dst, name="dst")
        peer = a.connect(b.metadata())
        remote = peer.region("dst")
        py_us, rust_us = small(a, peer, rs, remote, args.n, args.rounds)
        py_g, rust_g = big(a, peer, rs, remote, size, args.big_reps, args.rounds)
    f_us, n_us, r_us = nixl_loop(args.n // 2, args.rounds)
    res = {
        "small_write_64B": {"python_us": py_us, "rust_us": rust_us, "extra_us": py_us - rust_us},
        f"write_{args.big_mib}MiB": {"python_gbps": py_g, "rust_gbps": rust_g, "ratio": py_g / rust_g},
        "nixl_prepped_loop": {
            "facade_us": f_us, "native_python_us": n_us, "rust_us": r_us,
            "facade_over_native_us": f_us - n_us,
        },
    }
    print(f"small 64 B WRITE+wait: Python {py_us:.2f} µs, Rust {rust_us:.2f} µs: +{py_us - rust_us:.2f} µs per transfer (target ≤ 2)")
    print(f"{args.big_mib} MiB WRITE: Python {py_g:.2f} GB/s, Rust {rust_g:.2f} GB/s: {py_g / rust_g * 100:.1f} % (target ≥ 98 %)")
    print(f"NIXL loop (1 block READ): dmaplane.nixl {f_us:.2f} µs, native Python {n_us:.2f} µs, Rust {r_us:.2f} µs: facade +{f_us - n_us:.2f} µs over native (target ≤ 3)")
    if args.json:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
