"""dmaplane.nixl: NIXL's Python interface on dmaplane, driven the way serving engines drive
NIXL — register, exchange metadata, prepare descriptor lists, READ a set of block ids by
index, poll the state, notify the owner."""

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import dmaplane
from dmaplane.nixl._api import nixl_agent, nixl_agent_config
from dmaplane.nixl import _bindings
from dmaplane.nixl._bindings import nixlXferTelemetry  # what vLLM imports to find NIXL

BLOCK = 4096

PREFILL = textwrap.dedent(
    """
    import sys, time, numpy as np
    from dmaplane.nixl._api import nixl_agent, nixl_agent_config
    agent = nixl_agent("prefill", nixl_agent_config(backends=["UCX"]))
    kv = np.zeros((64, %(block)d), dtype=np.uint8)
    for i in range(64):
        kv[i] = i
    base = kv.__array_interface__["data"][0]
    # As vLLM registers its KV caches: (addr, len, device, label) tuples, owner keeps them alive.
    agent.register_memory([(base, kv.nbytes, 0, "")], "DRAM", backends=["UCX"])
    print(agent.get_agent_metadata().hex(), base, flush=True)
    deadline = time.time() + 60
    while not agent.check_remote_xfer_done("decode", b"req-7") and time.time() < deadline:
        time.sleep(0.001)
    print("NOTIFIED" if time.time() < deadline else "NO-NOTIFICATION", flush=True)
    while time.time() < deadline:
        if b"bye" in agent.get_new_notifs().get("decode", []):
            break
        time.sleep(0.001)
    """
    % {"block": BLOCK}
)


def test_a_two_process_paged_kv_exchange_the_way_a_serving_engine_does_it():
    server = subprocess.Popen(
        [sys.executable, "-c", PREFILL], stdout=subprocess.PIPE, text=True
    )
    try:
        meta_hex, rbase = server.stdout.readline().split()
        rbase = int(rbase)
        agent = nixl_agent("decode", nixl_agent_config(backends=["UCX"], capture_telemetry=True))
        pool = np.zeros((80, BLOCK), dtype=np.uint8)
        reg = agent.register_memory([pool])
        assert len(reg.regions) == 1
        name = agent.add_remote_agent(bytes.fromhex(meta_hex))
        assert name == b"prefill"  # bytes, as NIXL's binding returns it
        base = pool.__array_interface__["data"][0]
        local = agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", [(base + i * BLOCK, BLOCK, 0) for i in range(80)], "DRAM"
        )
        remote_descs = np.array(
            [(rbase + i * BLOCK, BLOCK, 0) for i in range(64)], dtype=np.uint64
        )
        remote = agent.prep_xfer_dlist(name, remote_descs, "DRAM")
        ids = np.array([5, 17, 40, 63], dtype=np.int64)
        slots = np.array([0, 1, 2, 79], dtype=np.int32)
        h = agent.make_prepped_xfer("READ", local, slots, remote, ids, b"req-7")
        state = agent.transfer(h)
        assert state in ("PROC", "DONE")
        deadline = time.time() + 30
        while agent.check_xfer_state(h) == "PROC" and time.time() < deadline:
            pass
        assert agent.check_xfer_state(h) == "DONE"
        for i, s in zip(ids, slots):
            assert (pool[s] == i).all()
        assert server.stdout.readline().strip() == "NOTIFIED"
        tel = agent.get_xfer_telemetry(h)
        assert isinstance(tel, nixlXferTelemetry)
        assert tel.totalBytes == 4 * BLOCK and tel.descCount == 4 and tel.xferDuration > 0
        # Re-posting a request that is still running is refused, as NIXL refuses it.
        agent.send_notif("prefill", b"bye")
        agent.release_xfer_handle(h)
        agent.release_dlist_handle(local)
        agent.release_dlist_handle(remote)
        agent.deregister_memory(reg)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()


@pytest.fixture
def sim_pair():
    tb = dmaplane.Testbed.builtin()
    conf = lambda nic: nixl_agent_config(dmaplane_backend="sim", testbed=tb, nics=[nic])
    a = nixl_agent("reader", conf("nic0"))
    b = nixl_agent("owner", conf("nic1"))
    yield a, b, tb
    a.native.close()
    b.native.close()


def test_strided_descriptor_arrays_and_str_or_bytes_names(sim_pair):
    a, b, _ = sim_pair
    src = np.arange(16 * BLOCK, dtype=np.uint32).view(np.uint8)[: 16 * BLOCK].copy()
    b.register_memory([src])
    dst = np.zeros(16 * BLOCK, dtype=np.uint8)
    a.register_memory([dst], backends=["UCX"])
    name = a.add_remote_agent(b.get_agent_metadata())
    assert a.check_remote_metadata(name) and a.check_remote_metadata("owner")
    sbase = src.__array_interface__["data"][0]
    dbase = dst.__array_interface__["data"][0]
    # NIXL >= 1.5's N×5 rows: (address, len, dev, stride, count).
    remote = a.prep_xfer_dlist(name, np.array([[sbase, BLOCK, 0, BLOCK, 16]], dtype=np.uint64), mem_type="DRAM")
    local = a.prep_xfer_dlist("NIXL_INIT_AGENT", np.array([[dbase, BLOCK, 0, BLOCK, 16]], dtype=np.uint64), mem_type="DRAM")
    assert len(remote) == 16 and len(local) == 16
    with pytest.raises(ValueError):
        a.prep_xfer_dlist(name, np.array([[sbase, BLOCK, 0, BLOCK, 16]], dtype=np.uint64))
    h = a.make_prepped_xfer("READ", local, list(range(16)), remote, list(range(16)))
    a.transfer(h)
    while a.check_xfer_state(h) != "DONE":
        pass
    assert np.array_equal(dst, src)
    # initialize_xfer + WRITE the other way, with a notification the owner sees.
    h2 = a.initialize_xfer(
        "WRITE",
        a.get_xfer_descs([(dbase, BLOCK, 0)], "DRAM"),
        a.get_xfer_descs([(sbase + BLOCK, BLOCK, 0)], "DRAM"),
        "owner",
        b"w-1",
    )
    a.transfer(h2)
    while a.check_xfer_state(h2) != "DONE":
        pass
    deadline = time.time() + 5
    while not b.check_remote_xfer_done(b"reader", b"w-"):
        assert time.time() < deadline
    # Unknown memory and agents are refused with NIXL's exceptions.
    with pytest.raises(_bindings.nixlNotFoundError):
        a.prep_xfer_dlist("NIXL_INIT_AGENT", [(0x1000, 16, 0)], "DRAM")
    with pytest.raises(_bindings.nixlNotFoundError):
        a.prep_xfer_dlist("nobody", [(sbase, 16, 0)], "DRAM")
    with pytest.raises(_bindings.nixlNotSupportedError):
        a.create_backend("GDS")


def test_a_deregistration_under_a_transfer_raises_nixls_error_with_the_revoke_chained(sim_pair):
    a, b, tb = sim_pair
    src = np.full(64 << 20, 9, dtype=np.uint8)
    reg = b.register_memory([src])
    dst = np.zeros(64 << 20, dtype=np.uint8)
    a.register_memory([dst])
    a.add_remote_agent(b.get_agent_metadata())
    sbase = src.__array_interface__["data"][0]
    dbase = dst.__array_interface__["data"][0]
    for _ in range(5):
        h = a.initialize_xfer(
            "READ",
            a.get_xfer_descs([(dbase, 64 << 20, 0)], "DRAM"),
            a.get_xfer_descs([(sbase, 64 << 20, 0)], "DRAM"),
            "owner",
        )
        a.transfer(h)
        while a.check_xfer_state(h) == "PROC" and not (dst[: 1 << 20] == 9).all():
            pass
        if a.check_xfer_state(h) == "PROC":
            break
        dst[:] = 0
    b.deregister_memory(reg)
    with pytest.raises(_bindings.nixlBackendError) as e:
        while a.check_xfer_state(h) == "PROC":
            pass
    assert isinstance(e.value.__cause__, dmaplane.RevokedError)
    assert e.value.__cause__.side == "remote"
    assert tb.verdict()["clean"]


def test_nixl_config_arguments_are_nixls():
    conf = nixl_agent_config(True, False, 5555, capture_telemetry=True, backends=["UCX"])
    assert conf.backends == ["UCX"] and conf.capture_telemetry
    with pytest.raises(TypeError):
        nixl_agent_config(sync_mode="strict")


def test_a_request_posts_one_at_a_time_and_says_what_is_wrong():
    tb = dmaplane.Testbed.builtin()
    conf = lambda nic: nixl_agent_config(
        capture_telemetry=True, dmaplane_backend="sim", testbed=tb, nics=[nic]
    )
    a, b = nixl_agent("reader", conf("nic0")), nixl_agent("owner", conf("nic1"))
    try:
        size = 64 << 20
        src = np.full(size, 5, dtype=np.uint8)
        dst = np.zeros(size, dtype=np.uint8)
        b.register_memory([src])
        a.register_memory([dst])
        name = a.add_remote_agent(b.get_agent_metadata())
        sb, db = src.__array_interface__["data"][0], dst.__array_interface__["data"][0]
        local = a.prep_xfer_dlist("NIXL_INIT_AGENT", [(db, size, 0)], "DRAM")
        remote = a.prep_xfer_dlist(name, [(sb, size, 0)], "DRAM")
        with pytest.raises(_bindings.nixlInvalidParamError, match="operation"):
            a.make_prepped_xfer("COPY", local, [0], remote, [0])
        ids = np.array([0], dtype=np.int32)
        # The message as str: the owner gets its bytes.
        h = a.make_prepped_xfer("READ", local, ids, remote, ids, "req-1")
        with pytest.raises(_bindings.nixlNotPostedError):
            a.check_xfer_state(h)
        with pytest.raises(_bindings.nixlNotPostedError):
            a.get_xfer_telemetry(h)
        # A second post while the first moves is refused (a 64 MiB READ takes milliseconds;
        # should one end before the second call, try again).
        refused = False
        for _ in range(5):
            before = time.time()
            assert a.transfer(h) in ("PROC", "DONE")
            try:
                a.transfer(h)
            except _bindings.nixlRepostActiveError:
                refused = True
            while a.check_xfer_state(h) != "DONE":
                pass
            if refused:
                break
        assert refused
        assert (dst == 5).all()
        tel = a.get_xfer_telemetry(h)
        assert tel.totalBytes == size and tel.descCount == 1
        assert 0 <= tel.postDuration <= tel.xferDuration and tel.xferDuration > 0
        assert before * 1e6 - 1e6 <= tel.startTime <= time.time() * 1e6
        deadline = time.time() + 5
        while not b.check_remote_xfer_done("reader", b"req-1"):
            assert time.time() < deadline
        # Posted again once DONE; released, it is refused.
        a.transfer(h, b"req-2")
        while a.check_xfer_state(h) != "DONE":
            pass
        a.release_xfer_handle(h)
        with pytest.raises(_bindings.nixlInvalidParamError, match="released"):
            a.transfer(h)
        with pytest.raises(_bindings.nixlInvalidParamError, match="notif_msg"):
            a.transfer(a.make_prepped_xfer("READ", local, ids, remote, ids), 42)
    finally:
        a.native.close()
        b.native.close()
