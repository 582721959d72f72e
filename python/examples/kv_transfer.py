"""Paged KV blocks between two processes, one notification per request — the disaggregated
prefill/decode exchange of a serving engine, on dmaplane's TCP backend.

    python python/examples/kv_transfer.py            # starts the prefill process itself
    python python/examples/kv_transfer.py --requests 50 --blocks-per-request 17

The prefill process registers a 64-block KV pool and prints its metadata; the decode process
(this one) connects, prepares both pools as block lists once, and for each request READs a set
of block ids by index into free slots of its own 80-block pool, with a notification that tells
prefill the request's blocks were read (so it may reuse them). Every block is verified.
"""

import argparse
import subprocess
import sys
import time

import numpy as np

import dmaplane

BLOCK = 16 << 10
PREFILL_BLOCKS, DECODE_BLOCKS = 64, 80


def prefill(requests):
    with dmaplane.Agent("prefill", backend="tcp") as agent:
        kv = np.empty((PREFILL_BLOCKS, BLOCK), dtype=np.uint8)
        for i in range(PREFILL_BLOCKS):
            kv[i] = i
        agent.register(kv, name="kv")
        print(agent.metadata().hex(), flush=True)
        for _ in range(requests):
            n = agent.next_notification(60, peer="decode", prefix="req-")
            if n is None:
                sys.exit("prefill: no notification from decode within 60 s")
        print("prefill: every request's blocks were read", flush=True)


def decode(args):
    server = subprocess.Popen(
        [sys.executable, __file__, "--role", "prefill", "--requests", str(args.requests)],
        stdout=subprocess.PIPE,
        text=True,
    )
    rng = np.random.default_rng(0)
    try:
        blob = bytes.fromhex(server.stdout.readline().strip())
        with dmaplane.Agent("decode", backend="tcp") as agent:
            pool = np.zeros((DECODE_BLOCKS, BLOCK), dtype=np.uint8)
            local = agent.register(pool, name="kv").blocks(BLOCK)
            peer = agent.connect(blob)
            remote = peer.region("kv").blocks(BLOCK)
            times = []
            for r in range(args.requests):
                ids = rng.choice(PREFILL_BLOCKS, args.blocks_per_request, replace=False)
                slots = rng.choice(DECODE_BLOCKS, args.blocks_per_request, replace=False)
                t0 = time.perf_counter()
                agent.read_blocks(peer, local, slots, remote, ids, notify=f"req-{r}").wait(30)
                times.append(time.perf_counter() - t0)
                for i, s in zip(ids, slots):
                    if not (pool[s] == i).all():
                        sys.exit(f"request {r}: slot {s} does not hold block {i}")
            kib = args.blocks_per_request * BLOCK / 1024
            times.sort()
            print(
                f"decode: {args.requests} requests of {args.blocks_per_request} blocks "
                f"({kib:.0f} KiB) verified; median {times[len(times) // 2] * 1e3:.2f} ms, "
                f"p99 {times[int(len(times) * 0.99)] * 1e3:.2f} ms per request"
            )
        print(server.stdout.readline().strip())
        if server.wait(30) != 0:
            sys.exit("prefill failed")
    finally:
        if server.poll() is None:
            server.kill()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=["decode", "prefill"], default="decode")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--blocks-per-request", type=int, default=17)
    a = p.parse_args()
    prefill(a.requests) if a.role == "prefill" else decode(a)
