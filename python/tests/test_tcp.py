"""Two Python processes on the TCP backend: the server registers an array and waits; this
process connects with its metadata, READs and WRITEs, and tells it it is done."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dmaplane

SERVER = textwrap.dedent(
    """
    import sys, numpy as np, dmaplane
    with dmaplane.Agent("server", backend="tcp") as s:
        pool = np.arange(1 << 22, dtype=np.uint32).view(np.uint8)[: 1 << 22].copy()
        r = s.register(pool, name="pool")
        print(s.metadata().hex(), flush=True)
        n = s.next_notification(60, peer="client", tag="written")
        assert n is not None, "no notification from the client"
        # The client wrote 0xab into the first MiB before notifying.
        ok = bool((pool[: 1 << 20] == 0xAB).all())
        print("VERIFIED" if ok else "CORRUPT", flush=True)
        s.next_notification(60, peer="client", tag="bye")
    """
)


@pytest.mark.parametrize("shm", [True])
def test_two_processes_read_and_write_over_tcp(shm):
    env = dict(os.environ)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        blob = bytes.fromhex(server.stdout.readline().strip())
        with dmaplane.Agent("client", backend="tcp") as c:
            peer = c.connect(blob)
            pool = peer.region("pool")
            assert len(pool) == 1 << 22
            mine = np.zeros(1 << 22, dtype=np.uint8)
            rm = c.register(mine)
            c.read(peer, rm[0 : 1 << 22], pool[0 : 1 << 22]).wait(30)
            want = np.arange(1 << 22, dtype=np.uint32).view(np.uint8)[: 1 << 22]
            assert np.array_equal(mine, want)
            mine[: 1 << 20] = 0xAB
            c.write(peer, rm[0 : 1 << 20], pool[0 : 1 << 20], notify="written").wait(30)
            assert server.stdout.readline().strip() == "VERIFIED"
            c.notify(peer, "bye")
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
