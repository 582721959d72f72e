"""Prepared block lists and transfers by index; files through the agent's drive; Ctrl-C."""

import _thread
import threading
import time

import numpy as np
import pytest

import dmaplane

BLOCK = 4096


def test_blocks_by_index_and_prepared_transfers_posted_again(pair):
    a, b, peer = pair
    pool = np.random.default_rng(7).integers(0, 255, 64 * BLOCK, dtype=np.uint8)
    b.register(pool, name="kv")
    mine = np.zeros(80 * BLOCK, dtype=np.uint8)
    local = a.register(mine).blocks(BLOCK)
    remote = peer.region("kv").blocks(BLOCK)
    assert (len(local), len(remote)) == (80, 64)
    ids = np.array([17, 3, 40], dtype=np.int32)
    slots = np.array([0, 79, 5], dtype=np.int64)
    a.read_blocks(peer, local, slots, remote, ids, notify="req-1").wait(10)
    for i, s in zip(ids, slots):
        assert np.array_equal(mine[s * BLOCK : (s + 1) * BLOCK], pool[i * BLOCK : (i + 1) * BLOCK])
    assert b.next_notification(5, tag="req-1").sender == a.name
    prepared = a.prepare_read(peer, local, [10, 11], remote, [60, 61])
    assert prepared.bytes == 2 * BLOCK and prepared.peer == b.name
    for k in range(3):
        pool[60 * BLOCK : 62 * BLOCK] = k
        prepared.post(("again", bytes([k]))).wait(10)
        assert (mine[10 * BLOCK : 12 * BLOCK] == k).all()
        assert b.next_notification(5, tag="again").data == bytes([k])
    # Bad indices name the side and the index.
    with pytest.raises(dmaplane.InvalidArgument) as e:
        a.read_blocks(peer, local, [80], remote, [0])
    assert "80" in str(e.value)
    with pytest.raises(dmaplane.InvalidArgument) as e:
        a.prepare_write(peer, local, [-1], remote, [0])
    assert e.value.field == "local_idx"
    assert isinstance(local[-1], dmaplane.Desc) and isinstance(remote[0], dmaplane.RemoteDesc)


def test_files_are_read_into_and_written_from_arrays(pair, tmp_path):
    a, _, _ = pair
    path = tmp_path / "shard.bin"
    data = np.random.default_rng(3).integers(0, 255, 1 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    f = a.register_file(dmaplane.FileSpec(str(path), buffered_fallback=True))
    assert len(f) == 1 << 20 and f.path == path.resolve()
    into = np.zeros(1 << 20, dtype=np.uint8)
    m = a.register(into)
    t = a.read_file(f.all(), m.all())
    assert t.wait(10) == 1 << 20 and t.done()
    assert np.array_equal(into, data)
    assert t.paths()[0]["path"] in ("direct", "bounced")
    out = tmp_path / "out.bin"
    w = a.register_file(dmaplane.FileSpec(str(out), create=1 << 20, buffered_fallback=True))
    assert w.writable
    assert a.write_file(m[0 : 1 << 20], w[0 : 1 << 20]).wait(10) == 1 << 20
    assert out.read_bytes() == data.tobytes()
    with pytest.raises(dmaplane.InvalidArgument):
        dmaplane.FileSpec(str(path), offset=4096)
    with pytest.raises(dmaplane.Error):
        a.register_file(str(tmp_path / "missing.bin"))


def test_shards_load_into_a_peers_memory_with_progress(pair, tmp_path):
    a, b, peer = pair
    shards = []
    weights = np.zeros(3 << 20, dtype=np.uint8)
    b.register(weights, name="weights")
    remote = peer.region("weights")
    for i in range(3):
        p = tmp_path / f"shard-{i}.bin"
        p.write_bytes(bytes([i + 1]) * (1 << 20))
        f = a.register_file(dmaplane.FileSpec(str(p), buffered_fallback=True))
        shards.append((f.all(), remote[i << 20 : (i + 1) << 20]))
    slots = a.register(np.zeros(2 << 20, dtype=np.uint8))
    steps = []
    report = a.load(
        peer, shards, [slots[0 : 1 << 20], slots[1 << 20 : 2 << 20]], 30,
        progress=lambda n, step: steps.append((n, step)),
    )
    assert report["shards"] == 3 and report["bytes"] == 3 << 20 and report["gbps"] > 0
    for i in range(3):
        assert (weights[i << 20 : (i + 1) << 20] == i + 1).all()
    assert (2, "send-done") in steps and len(steps) == 12


def test_ctrl_c_during_a_wait_raises_keyboard_interrupt_promptly(pair):
    a, _, _ = pair
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        a.next_notification(30)
    assert time.monotonic() - t0 < 2
    timer.join()
