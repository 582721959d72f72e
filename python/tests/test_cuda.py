"""CUDA memory from Python: an object with ``__cuda_array_interface__`` (as CuPy arrays and
torch CUDA tensors have) registered in place, held until deregistered, moved between two agents
on TCP NICs; refusals that name the field; NIXL's ``"VRAM"`` rows.

This machine has no GPU: the tests run in a child process against the fake CUDA driver built
from ``gpu/src/cuda/fake_libcuda.c`` (device memory is host memory there, and every driver call
is checked: a copy outside a live allocation, or a free of what was not allocated, aborts). On a
machine with a GPU, ``DMAPLANE_TEST_REAL_CUDA=1`` runs them against the real driver instead."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

FAKE_SRC = Path(__file__).resolve().parents[2] / "gpu" / "src" / "cuda" / "fake_libcuda.c"

CHILD = textwrap.dedent(
    r"""
    import ctypes, gc, sys, weakref
    import numpy as np
    import dmaplane
    from dmaplane.nixl._api import nixl_agent, nixl_agent_config

    cu = ctypes.CDLL("libcuda.so.1")
    def ok(r, what):
        assert r == 0, f"{what}: CUDA error {r}"
    ok(cu.cuInit(0), "cuInit")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    ok(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ok(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    ok(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    N = 4 << 20

    class DeviceArray:
        # What CuPy and torch expose: a pointer into an allocation, freed when the owner goes.
        def __init__(self, n, offset=512, strides=None, readonly=False):
            base = ctypes.c_uint64()
            ok(cu.cuMemAlloc_v2(ctypes.byref(base), ctypes.c_size_t(n + offset)), "cuMemAlloc")
            self.base, self.ptr, self.n = base.value, base.value + offset, n
            self.__cuda_array_interface__ = {
                "data": (self.ptr, readonly), "shape": (n,), "typestr": "|u1",
                "strides": strides, "version": 3,
            }
        def upload(self, a):
            ok(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            ok(cu.cuMemcpyHtoD_v2(ctypes.c_uint64(self.ptr), a.ctypes.data_as(ctypes.c_void_p),
                                  ctypes.c_size_t(a.nbytes)), "cuMemcpyHtoD")
        def download(self):
            ok(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            out = np.empty(self.n, dtype=np.uint8)
            ok(cu.cuMemcpyDtoH_v2(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(self.ptr),
                                  ctypes.c_size_t(self.n)), "cuMemcpyDtoH")
            return out
        def __del__(self):
            cu.cuCtxSetCurrent(ctx)
            ok(cu.cuMemFree_v2(ctypes.c_uint64(self.base)), "cuMemFree")

    data = (np.arange(N, dtype=np.uint64) * 2654435761 >> 11).astype(np.uint8)
    with dmaplane.Agent("gpu-side", backend="tcp") as a, dmaplane.Agent("host-side", backend="tcp") as b:
        t = DeviceArray(N)
        t.upload(data)
        ref = weakref.ref(t)
        rt = a.register(t, name="kv")
        assert rt.address == t.ptr, (hex(rt.address), hex(t.ptr))
        del t
        gc.collect()
        assert ref() is not None, "the registration let the device array go"
        dst = np.zeros(N, dtype=np.uint8)
        b.register(dst, name="dst")
        peer = a.connect(b.metadata())
        remote = peer.region("dst", timeout=10)
        a.write(peer, rt[0:N], remote[0:N], notify="w").wait(30)
        assert b.next_notification(10, tag="w") is not None
        assert np.array_equal(dst, data), "the WRITE from CUDA memory moved other bytes"
        dst[:] = data[::-1]
        a.read(peer, rt[0:N], remote[0:N]).wait(30)
        assert np.array_equal(ref().download(), dst), "the READ landed other bytes in CUDA memory"
        rt.deregister()
        gc.collect()
        assert ref() is None, "deregister did not let the device array go"

        # Refusals name the field and say why.
        for bad, field in (
            (DeviceArray(4096, strides=(2,)), "strides"),
            (DeviceArray(4096, readonly=True), "data"),
        ):
            try:
                a.register(bad)
                raise AssertionError(f"{field}: registered")
            except dmaplane.InvalidArgument as e:
                assert field in e.field, (field, e.field, str(e))
        class HostLie:
            __cuda_array_interface__ = {"data": (dst.ctypes.data, False), "shape": (N,),
                                        "typestr": "|u1", "version": 3}
        try:
            a.register(HostLie())
            raise AssertionError("host memory registered as CUDA memory")
        except (dmaplane.InvalidArgument, dmaplane.RegistrationError) as e:
            assert "address" in str(e) and "not CUDA device memory" in str(e), str(e)

        # Deregistered under a READ into it: RevokedError, and the array is given back.
        t2 = DeviceArray(N)
        r2 = a.register(t2, name="kv2")
        tr = a.read(peer, r2[0:N], remote[0:N])
        r2.deregister()
        try:
            tr.wait(30)
        except dmaplane.RevokedError as e:
            assert e.side == "local", e.side
        del t2

    # DLPack on a CUDA device (what JAX hands out): a legacy capsule made here by hand.
    class DLDevice(ctypes.Structure):
        _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]
    class DLDataType(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]
    class DLTensor(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int),
                    ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                    ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]
    class DLManagedTensor(ctypes.Structure):
        pass
    DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
    DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                                ("deleter", DELETER)]
    deleted = []
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    class CudaDLPack:
        def __init__(self, arr):
            self.arr, self.shape = arr, (ctypes.c_int64 * 1)(arr.n)
            self.deleter = DELETER(lambda _: deleted.append(1))
            self.mt = DLManagedTensor(
                DLTensor(arr.ptr, DLDevice(2, 0), 1, DLDataType(1, 8, 1), self.shape, None, 0),
                None, self.deleter)
        def __dlpack_device__(self):
            return (2, 0)
        def __dlpack__(self, stream=None, max_version=None):
            if max_version is not None:
                raise TypeError("a legacy producer")
            return new_capsule(ctypes.addressof(self.mt), b"dltensor", None)
    with dmaplane.Agent("dl-gpu", backend="tcp") as a, dmaplane.Agent("dl-host", backend="tcp") as b:
        t3 = DeviceArray(N)
        t3.upload(data)
        r3 = a.register(CudaDLPack(t3), name="dl")
        assert r3.address == t3.ptr
        del t3
        dst = np.zeros(N, dtype=np.uint8)
        b.register(dst, name="dst")
        peer = a.connect(b.metadata())
        a.write(peer, r3[0:N], peer.region("dst", timeout=10)[0:N]).wait(30)
        assert np.array_equal(dst, data), "the WRITE from a DLPack CUDA tensor moved other bytes"
        assert not deleted, "the DLPack deleter ran while registered"
        r3.deregister()
        assert deleted == [1], deleted

    # NIXL's VRAM rows: raw CUDA addresses the caller keeps alive.
    owner = nixl_agent("owner", nixl_agent_config(backends=["UCX"]))
    reader = nixl_agent("reader", nixl_agent_config(backends=["UCX"]))
    kv = DeviceArray(64 * 4096)
    kv.upload(np.repeat(np.arange(64, dtype=np.uint8), 4096))
    owner.register_memory([(kv.ptr, kv.n, 0, "")], "VRAM")
    dst = np.zeros(64 * 4096, dtype=np.uint8)
    reader.register_memory([dst])
    name = reader.add_remote_agent(owner.get_agent_metadata())
    local = reader.prep_xfer_dlist("NIXL_INIT_AGENT", [(dst.ctypes.data + i * 4096, 4096, 0) for i in range(64)], "DRAM")
    remote = reader.prep_xfer_dlist(name, [(kv.ptr + i * 4096, 4096, 0) for i in range(64)], "VRAM")
    ids = np.array([5, 9, 63], dtype=np.int64)
    h = reader.make_prepped_xfer("READ", local, ids, remote, ids, b"done")
    reader.transfer(h)
    while reader.check_xfer_state(h) != "DONE":
        pass
    for i in ids:
        assert (dst[i * 4096:(i + 1) * 4096] == i).all(), i
    print("CUDA-OK", flush=True)
    """
)


def _fake_driver(tmp):
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None or not FAKE_SRC.exists():
        return None, f"no C compiler ({cc}) or no {FAKE_SRC}"
    lib = Path(tmp) / "libcuda.so.1"
    r = subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-pthread", "-o", str(lib), str(FAKE_SRC)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return None, f"{cc} could not build the fake driver: {r.stderr}"
    return lib, None


def test_cuda_memory_is_registered_in_place_held_and_moved():
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if os.environ.get("DMAPLANE_TEST_REAL_CUDA") != "1":
            lib, why = _fake_driver(tmp)
            if lib is None:
                assert not os.environ.get("CI"), f"CI is set and {why}"
                pytest.skip(why)
            env["LD_LIBRARY_PATH"] = f"{tmp}:{env.get('LD_LIBRARY_PATH', '')}"
        r = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
        )
    assert r.returncode == 0 and "CUDA-OK" in r.stdout, f"{r.stdout}\n{r.stderr}"
    assert "FAKE CUDA" not in r.stderr, r.stderr
