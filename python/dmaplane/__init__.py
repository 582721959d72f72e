"""dmaplane: peer-to-peer, zero-copy data movement between NICs, GPU memory, storage and host
memory — with revoke honoured: memory freed under a transfer ends it with ``RevokedError``,
nothing lost, nothing written after the owner's ack.

The classes are the Rust library's (``dmaplane._dmaplane``), not a second implementation::

    import numpy as np, dmaplane

    with dmaplane.Agent("a") as a, dmaplane.Agent("b") as b:
        src, dst = np.arange(1 << 20, dtype=np.uint8), np.zeros(1 << 20, dtype=np.uint8)
        rs, rd = a.register(src), b.register(dst, name="dst")
        peer = a.connect(b.metadata())
        remote = peer.region("dst")
        a.write(peer, rs[0:4096], remote[0:4096], notify="done").wait(10)
        assert b.next_notification(5, tag="done") is not None
"""

from ._dmaplane import (
    Agent,
    Desc,
    FileRegion,
    FileSpec,
    FileTransfer,
    LocalBlocks,
    Notification,
    Peer,
    Prepared,
    Region,
    RemoteBlocks,
    RemoteDesc,
    RemoteRegion,
    Testbed,
    Transfer,
)
from . import errors
from .errors import (
    ConnectError,
    Error,
    InvalidArgument,
    NegotiationError,
    PeerLostError,
    RegistrationError,
    RevokedError,
    StalledError,
    TimeoutError,
    TransferError,
)


__all__ = [
    "Agent",
    "Desc",
    "FileRegion",
    "FileSpec",
    "FileTransfer",
    "LocalBlocks",
    "Notification",
    "Peer",
    "Prepared",
    "Region",
    "RemoteBlocks",
    "RemoteDesc",
    "RemoteRegion",
    "Testbed",
    "Transfer",
    "errors",
    "ConnectError",
    "Error",
    "InvalidArgument",
    "NegotiationError",
    "PeerLostError",
    "RegistrationError",
    "RevokedError",
    "StalledError",
    "TimeoutError",
    "TransferError",
]
