"""What `Agent.register` takes beyond the buffer protocol: DLPack producers (NumPy's
`__dlpack__`, torch where installed), raw addresses on the owner's word; and what it refuses."""

import ctypes
import gc

import numpy as np
import pytest

import dmaplane


class DLPackOnly:
    """A producer that speaks DLPack and nothing else (no buffer protocol), as a torch tensor
    or a JAX array does."""

    def __init__(self, arr, device=(1, 0)):
        self._arr = arr
        self._device = device

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._device


def test_a_dlpack_producer_is_registered_in_place_and_held(pair):
    a, b, peer = pair
    arr = np.arange(1 << 16, dtype=np.uint16)
    producer = DLPackOnly(arr)
    r = a.register(producer)
    assert r.address == arr.__array_interface__["data"][0]
    assert len(r) == arr.nbytes
    dst = np.zeros(arr.nbytes, dtype=np.uint8)
    b.register(dst, name="dst")
    remote = peer.region("dst")
    # The producer and the array go out of Python's hands: the registration holds them.
    del producer, arr
    gc.collect()
    junk = [np.full(1 << 17, 7, dtype=np.uint8) for _ in range(16)]
    a.write(peer, r[0 : len(r)], remote[0 : len(r)]).wait(10)
    assert np.array_equal(dst.view(np.uint16), np.arange(1 << 16, dtype=np.uint16))
    r.deregister()
    del junk


def test_dlpack_refusals_say_why(pair):
    a, _, _ = pair
    arr = np.zeros((64, 64), dtype=np.float32)
    with pytest.raises(dmaplane.InvalidArgument) as e:
        a.register(DLPackOnly(arr[:, ::2]))
    assert "contiguous" in str(e.value)
    with pytest.raises(dmaplane.InvalidArgument) as e:
        a.register(DLPackOnly(arr, device=(10, 0)))
    assert "rocm:0" in str(e.value) and "CUDA memory" in str(e.value)


def test_torch_tensors_register_where_torch_is_installed(pair):
    torch = pytest.importorskip("torch")
    a, b, peer = pair
    t = torch.arange(4096, dtype=torch.int32)
    r = a.register(t)
    assert r.address == t.data_ptr()
    dst = np.zeros(t.numel() * 4, dtype=np.uint8)
    b.register(dst, name="dst")
    a.write(peer, r.all(), peer.region("dst").all()).wait(10)
    assert np.array_equal(dst.view(np.int32), t.numpy())
    with pytest.raises(dmaplane.InvalidArgument):
        a.register(torch.zeros(8, 8).t())


def test_a_raw_address_is_registered_only_on_the_owners_word(pair):
    a, b, peer = pair
    buf = (ctypes.c_uint8 * 8192)()
    ctypes.memset(buf, 5, 8192)
    addr = ctypes.addressof(buf)
    with pytest.raises(dmaplane.InvalidArgument) as e:
        a.register_address(addr, 8192)
    assert e.value.field == "owner_keeps_alive"
    r = a.register_address(addr, 8192, owner_keeps_alive=True)
    assert r.address == addr and not r.read_only
    dst = np.zeros(8192, dtype=np.uint8)
    b.register(dst, name="dst")
    a.write(peer, r[0:8192], peer.region("dst")[0:8192]).wait(10)
    assert (dst == 5).all()
    r.deregister()
    # An address nothing maps is refused before any NIC is told of it.
    with pytest.raises(dmaplane.InvalidArgument) as e:
        a.register_address(0x10, 4096, owner_keeps_alive=True)
    assert e.value.field == "addr" and "not mapped" in str(e.value)


def test_cuda_array_interface_objects_are_checked_before_any_driver_call(pair):
    # (test_cuda.py registers and moves CUDA memory, on the fake driver.)
    a, _, _ = pair

    class NoData:
        __cuda_array_interface__ = {"shape": (16,), "typestr": "<f4", "version": 3}

    with pytest.raises(dmaplane.InvalidArgument) as e:
        a.register(NoData())
    assert e.value.field == '__cuda_array_interface__["data"]', e.value.field

    class Strided:
        __cuda_array_interface__ = {
            "shape": (4, 4), "typestr": "<f4", "data": (0x1000, False), "strides": (4, 16),
            "version": 3,
        }

    with pytest.raises(dmaplane.InvalidArgument) as e:
        a.register(Strided())
    assert "contiguous" in str(e.value)

    class Device:
        __cuda_array_interface__ = {"shape": (16,), "typestr": "<f4", "data": (0x1000, False)}

    # Well formed: the driver decides (here there is none, or it does not know the address).
    with pytest.raises(dmaplane.Error) as e:
        a.register(Device())
    assert "CUDA" in str(e.value)
