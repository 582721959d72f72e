"""The same two-process KV exchange on real NIXL and on dmaplane.nixl, side by side in one run.

    python python/bench_nixl.py --nixl-python /path/to/venv-with-nixl/bin/python

The real NIXL comes from PyPI (`pip install --no-deps nixl-cu12 numpy` in a virtual
environment of its own); it runs on the CPU with UCX over host memory. Each implementation runs
the exchange a serving engine does, as two processes on this host: the owner registers a
64-block KV pool (64 KiB blocks) and a 64 MiB buffer and hands out its metadata; the reader
registers its own, adds the owner, prepares both descriptor lists once, READs a set of 17 block
ids by index with a notification, polls until DONE, and then READs the 64 MiB buffer a few
times. Reported per implementation: the block-set READ's time to DONE, the time until the
owner saw the notification, and 64 MiB READ throughput. NIXL runs with UCX_TLS=tcp and with
UCX's default transports; dmaplane.nixl on its TCP backend (shared memory between processes of
one host, as UCX's default uses it too).
"""

import os
import sys

# python/ holds the package's sources (without its native module): use the installed package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import json
import os
import subprocess
import sys
import time

BLOCK = 64 << 10
OWNER_BLOCKS, READER_BLOCKS, SET = 64, 80, 17
BIG = 64 << 20


def api(impl):
    if impl == "dmaplane":
        from dmaplane.nixl import _api
    else:
        try:
            from nixl import _api
        except ImportError:
            from nixl_cu12 import _api
    return _api


def owner(impl):
    import numpy as np

    m = api(impl)
    agent = m.nixl_agent("owner", m.nixl_agent_config(backends=["UCX"]))
    kv = np.empty((OWNER_BLOCKS, BLOCK), dtype=np.uint8)
    for i in range(OWNER_BLOCKS):
        kv[i] = i
    big = np.full(BIG, 7, dtype=np.uint8)
    kb, bb = kv.__array_interface__["data"][0], big.__array_interface__["data"][0]
    agent.register_memory([(kb, kv.nbytes, 0, ""), (bb, BIG, 0, "")], "DRAM")
    print(json.dumps({"meta": agent.get_agent_metadata().hex(), "kv": kb, "big": bb}), flush=True)
    deadline = time.time() + 120
    while not agent.check_remote_xfer_done("reader", b"req-1"):
        if time.time() > deadline:
            sys.exit("owner: no notification")
    print(json.dumps({"notified_at": time.time()}), flush=True)
    while not agent.check_remote_xfer_done("reader", b"bye"):
        if time.time() > deadline:
            sys.exit("owner: no bye")
        time.sleep(0.001)


def reader(impl, info):
    import numpy as np

    m = api(impl)
    agent = m.nixl_agent("reader", m.nixl_agent_config(backends=["UCX"]))
    pool = np.zeros((READER_BLOCKS, BLOCK), dtype=np.uint8)
    big = np.zeros(BIG, dtype=np.uint8)
    pb, bb = pool.__array_interface__["data"][0], big.__array_interface__["data"][0]
    agent.register_memory([(pb, pool.nbytes, 0, ""), (bb, BIG, 0, "")], "DRAM")
    name = agent.add_remote_agent(bytes.fromhex(info["meta"]))
    deadline = time.time() + 30
    while not agent.check_remote_metadata(name):
        assert time.time() < deadline
    local = agent.prep_xfer_dlist(
        "NIXL_INIT_AGENT",
        np.array([(pb + i * BLOCK, BLOCK, 0) for i in range(READER_BLOCKS)], dtype=np.uint64),
        "DRAM",
    )
    remote = agent.prep_xfer_dlist(
        name,
        np.array([(info["kv"] + i * BLOCK, BLOCK, 0) for i in range(OWNER_BLOCKS)], dtype=np.uint64),
        "DRAM",
    )
    rng = np.random.default_rng(1)
    ids = rng.choice(OWNER_BLOCKS, SET, replace=False).astype(np.int64)
    slots = rng.choice(READER_BLOCKS, SET, replace=False).astype(np.int64)

    def run(h, msg=b""):
        st = agent.transfer(h, msg) if msg else agent.transfer(h)
        while st != "DONE":
            st = agent.check_xfer_state(h)
            if st == "ERR":
                sys.exit("transfer ERR")

    # Warm the path (connections, first registrations) with one READ of another block.
    run(agent.make_prepped_xfer("READ", local, [READER_BLOCKS - 1], remote, [0]))
    h = agent.make_prepped_xfer("READ", local, slots, remote, ids, b"req-1")
    posted = time.time()
    t0 = time.perf_counter()
    run(h)
    done_us = (time.perf_counter() - t0) * 1e6
    for i, s in zip(ids, slots):
        assert (pool[s] == i).all(), f"slot {s} != block {i}"
    big_l = agent.prep_xfer_dlist("NIXL_INIT_AGENT", [(bb, BIG, 0)], "DRAM")
    big_r = agent.prep_xfer_dlist(name, [(info["big"], BIG, 0)], "DRAM")
    hb = agent.make_prepped_xfer("READ", big_l, [0], big_r, [0])
    run(hb)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        run(hb)
    gbps = BIG * reps / (time.perf_counter() - t0) / 1e9
    assert (big == 7).all()
    agent.send_notif(name, b"bye")
    print(json.dumps({"posted_at": posted, "done_us": done_us, "gbps": gbps}), flush=True)


def json_line(stream):
    """The next line of `stream` that is a JSON object (NIXL logs to stdout too)."""
    for line in stream:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("the owner ended without a word")


def one(python, impl, env_extra):
    env = dict(os.environ, **env_extra)
    o = subprocess.Popen([python, __file__, "--role", "owner", "--impl", impl], stdout=subprocess.PIPE, text=True, env=env)
    try:
        info = json_line(o.stdout)
        r = subprocess.run(
            [python, __file__, "--role", "reader", "--impl", impl, "--info", json.dumps(info)],
            capture_output=True, text=True, env=env, timeout=180,
        )
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1:] }
        got = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
        note = json_line(o.stdout)
        o.wait(30)
        got["notified_us"] = (note["notified_at"] - got.pop("posted_at")) * 1e6
        return got
    finally:
        if o.poll() is None:
            o.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["owner", "reader", "both"], default="both")
    ap.add_argument("--impl", choices=["dmaplane", "nixl"], default="dmaplane")
    ap.add_argument("--info")
    ap.add_argument("--nixl-python", help="an interpreter with NIXL installed (nixl-cu12)")
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration (median)")
    a = ap.parse_args()
    if a.role == "owner":
        return owner(a.impl)
    if a.role == "reader":
        return reader(a.impl, json.loads(a.info))
    configs = [("dmaplane.nixl (TCP backend)", sys.executable, "dmaplane", {})]
    if a.nixl_python:
        configs += [
            ("NIXL 1.x, UCX_TLS=tcp", a.nixl_python, "nixl", {"UCX_TLS": "tcp"}),
            ("NIXL 1.x, UCX default", a.nixl_python, "nixl", {}),
        ]
    print(f"{'':32} {'block set READ → DONE':>22} {'→ owner notified':>18} {'64 MiB READ':>12}")
    for label, py, impl, env in configs:
        runs = [one(py, impl, env) for _ in range(a.runs)]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(f"{label:32} failed: {runs[0]['error']}")
            continue
        med = lambda k: sorted(r[k] for r in ok)[len(ok) // 2]
        print(f"{label:32} {med('done_us'):>19.0f} µs {med('notified_us'):>15.0f} µs {med('gbps'):>8.2f} GB/s")


if __name__ == "__main__":
    main()
