"""What ``nixl._bindings`` offers that Python code looks at: the status and memory-type
constants, the exception classes NIXL's binding raises, ``nixlXferTelemetry`` (vLLM imports it
to decide NIXL is present) and the descriptor lists ``get_reg_descs`` / ``get_xfer_descs``
return. Nothing here talks to a NIC: the facade in ``dmaplane.nixl._api`` does, through the
dmaplane agent."""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

DEFAULT_COMM_PORT = 8888
NIXL_INIT_AGENT = "NIXL_INIT_AGENT"

# nixl_status_t
NIXL_IN_PROG = 1
NIXL_SUCCESS = 0
NIXL_ERR_NOT_POSTED = -1
NIXL_ERR_INVALID_PARAM = -2
NIXL_ERR_BACKEND = -3
NIXL_ERR_NOT_FOUND = -4
NIXL_ERR_MISMATCH = -5
NIXL_ERR_NOT_ALLOWED = -6
NIXL_ERR_REPOST_ACTIVE = -7
NIXL_ERR_UNKNOWN = -8
NIXL_ERR_NOT_SUPPORTED = -9

# nixl_mem_t
DRAM_SEG, VRAM_SEG, BLK_SEG, OBJ_SEG, FILE_SEG = range(5)
# nixl_xfer_op_t
NIXL_READ, NIXL_WRITE = 0, 1
# nixl_thread_sync_t
NIXL_THREAD_SYNC_NONE, NIXL_THREAD_SYNC_STRICT, NIXL_THREAD_SYNC_RW = 0, 1, 2
NIXL_THREAD_SYNC_DEFAULT = NIXL_THREAD_SYNC_NONE
NIXL_COST_ANALYTICAL_BACKEND = 0

MEM_TYPES = {
    "DRAM": DRAM_SEG,
    "VRAM": VRAM_SEG,
    "FILE": FILE_SEG,
    "BLOCK": BLK_SEG,
    "OBJ": OBJ_SEG,
    "cpu": DRAM_SEG,
    "cuda": VRAM_SEG,
}


class nixlError(Exception):
    """Base of the facade's NIXL exceptions (NIXL's own derive from ``Exception`` directly;
    catching ``Exception`` or the specific class works the same). When dmaplane knows more
    (a revoke, a lost peer), the native exception is chained: ``e.__cause__``."""

    status = NIXL_ERR_UNKNOWN


class nixlNotPostedError(nixlError):
    status = NIXL_ERR_NOT_POSTED


class nixlInvalidParamError(nixlError):
    status = NIXL_ERR_INVALID_PARAM


class nixlBackendError(nixlError):
    status = NIXL_ERR_BACKEND


class nixlNotFoundError(nixlError):
    status = NIXL_ERR_NOT_FOUND


class nixlMismatchError(nixlError):
    status = NIXL_ERR_MISMATCH


class nixlNotAllowedError(nixlError):
    status = NIXL_ERR_NOT_ALLOWED


class nixlRepostActiveError(nixlError):
    status = NIXL_ERR_REPOST_ACTIVE


class nixlUnknownError(nixlError):
    status = NIXL_ERR_UNKNOWN


class nixlNotSupportedError(nixlError):
    status = NIXL_ERR_NOT_SUPPORTED


class nixlRemoteDisconnectError(nixlError):
    status = NIXL_ERR_BACKEND


class nixlCancelledError(nixlError):
    status = NIXL_ERR_UNKNOWN


class nixlNoTelemetryError(nixlError):
    status = NIXL_ERR_NOT_FOUND


@dataclasses.dataclass
class nixlXferTelemetry:
    """A transfer request's telemetry, as NIXL reports it: ``startTime`` (µs since the epoch,
    when it was posted), ``postDuration`` (µs the post took), ``xferDuration`` (µs from the post
    to the completion the facade observed), ``totalBytes`` and ``descCount``."""

    startTime: int = 0
    postDuration: int = 0
    xferDuration: int = 0
    totalBytes: int = 0
    descCount: int = 0


class _DList:
    """A descriptor list of one memory type: rows, indexable and iterable, as NIXL's are."""

    __slots__ = ("mem_type", "descs")

    def __len__(self):
        return len(self.descs)

    def __getitem__(self, i):
        return self.descs[i]

    def __iter__(self):
        return iter(self.descs)

    def getType(self):
        return self.mem_type

    def descCount(self):
        return len(self.descs)

    def __repr__(self):
        return f"{type(self).__name__}(mem_type={self.mem_type}, {len(self.descs)} descs)"


class nixlXferDList(_DList):
    """A transfer descriptor list: ``(addr, len, dev_id)`` rows of one memory type."""

    __slots__ = ()

    def __init__(self, mem_type: int, descs=()):
        self.mem_type = mem_type
        self.descs: List[Tuple[int, int, int]] = [
            (int(a), int(n), int(d)) for a, n, d, *_ in _rows(descs)
        ]


class nixlRegDList(_DList):
    """A registration descriptor list: ``(addr, len, dev_id, meta)`` rows of one memory type;
    once registered, it holds the dmaplane registrations (``regions``)."""

    __slots__ = ("regions", "objects")

    def __init__(self, mem_type: int, descs=()):
        self.mem_type = mem_type
        self.descs: List[Tuple[int, int, int, str]] = []
        for row in _rows(descs):
            a, n, d = int(row[0]), int(row[1]), int(row[2])
            meta = row[3] if len(row) > 3 else ""
            self.descs.append((a, n, d, meta))
        self.regions: list = []
        self.objects: list = []

    def trim(self):
        """The ``(addr, len, dev_id)`` rows, as a transfer list."""
        return nixlXferDList(self.mem_type, [d[:3] for d in self.descs])


def _rows(descs):
    tolist = getattr(descs, "tolist", None)
    return tolist() if tolist is not None else list(descs)
