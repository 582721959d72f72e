"""Checkpoint shards from files into arrays through the storage path, then into a peer's
memory — weight loading as a training or serving job does it.

    python python/examples/checkpoint_load.py [--shards 8 --shard-mib 4]

Writes the shards to a temporary directory, registers each as a file range (O_DIRECT where
the file system allows it), reads them into a NumPy array with `read_file` (the agent's drive
moves the bytes), then loads the same shards into a second agent's array with `load` (two
slots: the read of shard n + 1 overlaps the send of shard n), printing progress. Every byte is
verified.
"""

import argparse
import os
import tempfile
import time

import numpy as np

import dmaplane


def main(shards, shard_mib):
    size = shard_mib << 20
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(shards):
            p = os.path.join(d, f"shard-{i:04d}.bin")
            np.full(size, i + 1, dtype=np.uint8).tofile(p)
            paths.append(p)
        testbed = dmaplane.Testbed.builtin()
        with dmaplane.Agent("loader", nics=["nic0"], testbed=testbed) as loader, dmaplane.Agent(
            "trainer", nics=["nic1"], testbed=testbed
        ) as trainer:
            files = [
                loader.register_file(dmaplane.FileSpec(p, buffered_fallback=True)) for p in paths
            ]
            print(f"{shards} shards of {shard_mib} MiB; O_DIRECT: {files[0].direct}")
            # 1. Files into a local array through the storage path.
            weights = np.zeros(shards * size, dtype=np.uint8)
            w = loader.register(weights, name="weights")
            t0 = time.perf_counter()
            t = loader.read_file([f.all() for f in files], [w[i * size : (i + 1) * size] for i in range(shards)])
            moved = t.wait(60)
            dt = time.perf_counter() - t0
            for i in range(shards):
                assert (weights[i * size : (i + 1) * size] == i + 1).all(), f"shard {i}"
            print(f"read_file: {moved >> 20} MiB in {dt * 1e3:.1f} ms ({moved / dt / 1e9:.2f} GB/s), {t.paths()[0]['path']}")
            # 2. The same shards into the trainer's array: file -> slot -> NIC.
            remote_weights = np.zeros(shards * size, dtype=np.uint8)
            trainer.register(remote_weights, name="weights")
            peer = loader.connect(trainer.metadata())
            rw = peer.region("weights")
            slots = loader.register(np.zeros(2 * size, dtype=np.uint8), name="slots")

            def progress(n, step):
                if step == "send-done":
                    print(f"  shard {n} landed", flush=True)

            report = loader.load(
                peer,
                [(f.all(), rw[i * size : (i + 1) * size]) for i, f in enumerate(files)],
                [slots[0:size], slots[size : 2 * size]],
                timeout=60,
                progress=progress,
            )
            for i in range(shards):
                assert (remote_weights[i * size : (i + 1) * size] == i + 1).all(), f"shard {i}"
            print(f"load: {report['shards']} shards, {report['bytes'] >> 20} MiB in {report['seconds'] * 1e3:.1f} ms ({report['gbps']:.2f} GB/s), verified")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-mib", type=int, default=4)
    a = p.parse_args()
    main(a.shards, a.shard_mib)
