"""Memory stays flat over many small transfers and registrations (RSS from /proc)."""

import os

import numpy as np




def rss_kib():
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_100000_small_transfers_and_registrations_keep_memory_flat(pair):
    a, b, peer = pair
    dst = np.zeros(4096, dtype=np.uint8)
    b.register(dst, name="dst")
    remote = peer.region("dst")[0:64]
    src = np.ones(4096, dtype=np.uint8)
    rs = a.register(src)
    local = rs[0:64]

    def transfers(n):
        for _ in range(n):
            a.write(peer, local, remote).wait(10)

    def registrations(n):
        for _ in range(n):
            buf = bytearray(64)
            r = a.register(buf)
            r.deregister()

    transfers(5000)
    registrations(1000)
    before = rss_kib()
    transfers(100_000)
    registrations(10_000)
    after = rss_kib()
    assert after - before < 32 * 1024, f"RSS grew {after - before} KiB"
