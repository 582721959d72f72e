"""NIXL's Python agent, measured as `dmaplane agent bench` measures dmaplane: two processes on
this host, host memory, UCX (its default transports unless UCX_TLS says otherwise).

Run by `dmaplane agent bench` when `nixl_cu12` (or `nixl`) imports; prints one JSON object.
Usage: python3 nixl_bench.py SIZE BLOCK SMALL BATCH ROUNDS SECONDS
"""
import json
import multiprocessing as mp
import sys
import time

try:
    from nixl_cu12._api import nixl_agent, nixl_agent_config
except ImportError:
    from nixl._api import nixl_agent, nixl_agent_config
import numpy as np


def agent(name):
    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def target(size, conn):
    a = agent("target")
    buf = np.zeros(size, dtype=np.uint8)
    reg = a.register_memory([(buf.ctypes.data, size, 0, "")], "DRAM")
    conn.send((a.get_agent_metadata(), buf.ctypes.data))
    conn.recv()  # until the initiator is done
    a.deregister_memory(reg)


def wait(a, h):
    st = a.transfer(h)
    while st == "PROC":
        st = a.check_xfer_state(h)
    if st != "DONE":
        raise RuntimeError(f"NIXL transfer ended {st}")


def main():
    size, block, small, batch, rounds = (int(x) for x in sys.argv[1:6])
    seconds = float(sys.argv[6])
    parent, child = mp.Pipe()
    p = mp.Process(target=target, args=(size, child))
    p.start()
    meta, raddr = parent.recv()
    a = agent("initiator")
    buf = np.ones(size, dtype=np.uint8)
    a.register_memory([(buf.ctypes.data, size, 0, "")], "DRAM")
    peer = a.add_remote_agent(meta)
    laddr = buf.ctypes.data

    def descs(base, n, each):
        return a.get_xfer_descs([(base + i * each, each, 0) for i in range(n)], "DRAM")

    nblocks = size // block
    large = {}
    for op in ("WRITE", "READ"):
        h = a.initialize_xfer(op, descs(laddr, nblocks, block), descs(raddr, nblocks, block), peer)
        wait(a, h)  # warm-up: connections made, pages touched
        gbps = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            wait(a, h)
            gbps.append(size / (time.perf_counter() - t0) / 1e9)
        a.release_xfer_handle(h)
        gbps.sort()
        large[op] = {"median_gbps": gbps[len(gbps) // 2], "best_gbps": gbps[-1]}
    h = a.initialize_xfer("WRITE", descs(laddr, batch, small), descs(raddr, batch, small), peer)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 100:
        t0 = time.perf_counter()
        wait(a, h)
        times.append(time.perf_counter() - t0)
    a.release_xfer_handle(h)
    times.sort()
    total = sum(times)
    n = len(times) * batch
    out = {
        "write": large["WRITE"],
        "read": large["READ"],
        "small_write": {
            "rate": n / total,
            "gbps": n * small / total / 1e9,
            "p50_us": times[len(times) // 2] * 1e6,
            "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6,
            "batches": len(times),
        },
    }
    parent.send("done")
    p.join()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
