"""The shapes NIXL's descriptors come in — objects (tensors, arrays, buffers), ``(addr, len,
dev[, label])`` tuples, N×3 and N×5 (strided) arrays — turned into rows, and the names
registrations are announced under so a peer finds them by address."""

from __future__ import annotations

import sys
from typing import Tuple

from dmaplane import _dmaplane as _native

from . import _bindings as nixlBind
from ._bindings import MEM_TYPES, nixlInvalidParamError


def _is_torch_tensor(obj) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _cuda_interface(obj):
    """``obj.__cuda_array_interface__`` for CUDA memory that is not also host memory, else
    None (a torch CPU tensor raises AttributeError for it)."""
    if hasattr(obj, "__array_interface__"):
        return None
    try:
        return obj.__cuda_array_interface__
    except AttributeError:
        return None


def _reg_name(mem_type, dev, addr, length) -> str:
    """The name a registration is announced under: peers find the addresses in it."""
    return f"nixl:{_mem_name(mem_type)}:{dev}:{addr:x}:{length:x}"


def _parse_reg_name(remote_region):
    parts = remote_region.name.split(":")
    if len(parts) != 5 or parts[0] != "nixl":
        return None
    try:
        addr, length = int(parts[3], 16), int(parts[4], 16)
    except ValueError:
        return None
    return addr, addr + length, remote_region


def _mem_name(mem_type) -> str:
    for k, v in MEM_TYPES.items():
        if v == mem_type and k.isupper():
            return k
    return str(mem_type)


def _objects(descs):
    """The objects of a list of tensors/arrays/buffers (or of one), else None (tuples or
    a numeric table)."""
    if _is_obj(descs):
        return [descs]
    if isinstance(descs, (list, tuple)) and descs and _is_obj(descs[0]):
        return list(descs)
    return None


def _is_obj(o) -> bool:
    if _is_torch_tensor(o) or _cuda_interface(o) is not None:
        return True
    if isinstance(o, (bytearray, memoryview)):
        return True
    ai = getattr(o, "__array_interface__", None)
    return ai is not None and not _is_table(o)


def _is_table(o) -> bool:
    """An N×3 / N×4 / N×5 array of 64-bit integers is a descriptor table (as NIXL takes every
    array it is given); any other array is memory to register (dmaplane's extension)."""
    shape = getattr(o, "shape", None)
    dtype = getattr(o, "dtype", None)
    return (
        shape is not None
        and len(shape) == 2
        and shape[1] in (3, 4, 5)
        and getattr(dtype, "kind", "") in ("i", "u")
        and getattr(dtype, "itemsize", 0) == 8
    )


def _obj_desc(o) -> Tuple[int, int, int]:
    if _is_torch_tensor(o):
        if not o.is_contiguous():
            raise nixlInvalidParamError(
                "tensor is not contiguous: register tensor.contiguous() (a NIC moves one run "
                "of bytes)"
            )
        dev = o.get_device()
        return o.data_ptr(), o.numel() * o.element_size(), max(dev, 0)
    if isinstance(o, (bytearray, memoryview)):
        mv = memoryview(o)
        return _native.address_of(mv), mv.nbytes, 0
    cai = _cuda_interface(o)
    if cai is not None:
        n = int(cai["typestr"][2:])
        for d in cai["shape"]:
            n *= d
        return cai["data"][0], n, 0
    ai = o.__array_interface__
    return ai["data"][0], o.nbytes, 0


def _obj_mem(objs) -> int:
    kinds = {nixlBind.VRAM_SEG if _is_cuda(o) else nixlBind.DRAM_SEG for o in objs}
    if len(kinds) > 1:
        raise nixlInvalidParamError("a list of tensors on more than one device type")
    return kinds.pop()


def _is_cuda(o) -> bool:
    """CUDA memory: a torch tensor on a GPU, or an object with the CUDA array interface."""
    if _is_torch_tensor(o):
        return o.get_device() >= 0
    return _cuda_interface(o) is not None


def _table(descs, widths, what) -> list:
    tolist = getattr(descs, "tolist", None)
    rows = tolist() if tolist is not None else list(descs)
    for r in rows:
        if len(r) not in widths:
            raise nixlInvalidParamError(
                f"{what} descriptors: rows of {' or '.join(map(str, widths))} values "
                f"(addr, len, dev_id{', label' if 4 in widths else ''}), got {r!r}"
            )
    return [tuple(r) for r in rows]


def _strided(xfer_list, mem_type, check_mem):
    """An N×5 array (address, len, dev, stride, count) as rows, or None for other lists."""
    shape = getattr(xfer_list, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != 5:
        return None
    if mem_type is None:
        raise ValueError("Please specify a mem type for strided descriptors")
    check_mem(mem_type)
    rows = []
    for addr, length, dev, stride, count in xfer_list.tolist():
        if count < 0 or stride < 0 or length <= 0:
            raise nixlInvalidParamError(
                f"strided descriptor ({addr:#x}, {length}, {dev}, {stride}, {count}): length "
                "> 0, stride and count ≥ 0"
            )
        rows.extend((addr + k * stride, length, dev) for k in range(count))
    return rows
