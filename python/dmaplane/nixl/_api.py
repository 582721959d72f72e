"""NIXL's Python interface (``nixl._api``) on dmaplane: the subset serving frameworks use, with
NIXL's names, argument shapes and return values, so code written for NIXL runs by changing its
import (``from dmaplane.nixl._api import nixl_agent, nixl_agent_config``).

Where it differs from NIXL, and why:

- Memory given as an object (a NumPy array, a ``bytearray``, a torch tensor on the CPU or a
  GPU, a CuPy array, anything with the buffer protocol, ``__dlpack__`` or
  ``__cuda_array_interface__``) is held by the registration until ``deregister_memory``:
  dropping the object while it is registered cannot free it under a NIC. NIXL keeps no
  reference.
- Raw ``(addr, len, dev_id, label)`` tuples and N×3 arrays register memory the caller owns and
  keeps alive until ``deregister_memory``, as NIXL requires; the facade checks that every
  ``"DRAM"`` range is mapped in this process (``/proc/self/maps``), and with the CUDA driver
  that every ``"VRAM"`` range is device memory inside one allocation, and refuses one that is
  not, naming it. dmaplane does not synchronise CUDA streams (nor does NIXL).
- A revoke (memory deregistered or freed under a transfer) and a lost peer are raised as the
  NIXL exception for that status (``nixlBackendError``, ``nixlRemoteDisconnectError``) with
  dmaplane's exception chained (``e.__cause__``: ``RevokedError`` names the side, the region and
  the epoch). ``check_xfer_state`` returns ``"ERR"`` only where NIXL's binding would too.
- ``remove_remote_agent`` forgets the peer here (its descriptor lists and transfers are
  refused); the dmaplane connection stays until the agent closes.
- Transfers go over dmaplane's TCP backend by default (``backends=["UCX"]``, what vLLM passes,
  maps to it); ``nixl_agent_config(dmaplane_backend="sim", testbed=...)`` uses the simulated
  testbed. Storage backends (``GDS``, ``POSIX``, ...) and ``"FILE"`` memory are not offered:
  use dmaplane's own ``register_file`` / ``read_file``.
- ``xferDuration`` in telemetry runs from the post to the completion the facade observed (in
  ``check_xfer_state``), as NIXL's does.
"""

from __future__ import annotations

import bisect
import threading
from enum import Enum
from typing import Dict, List, Optional, Tuple

import dmaplane
from dmaplane import _dmaplane as _native

from . import _bindings as nixlBind
from ._descs import (
    _mem_name,
    _obj_desc,
    _obj_mem,
    _objects,
    _parse_reg_name,
    _reg_name,
    _strided,
    _table,
)
from ._bindings import (
    DEFAULT_COMM_PORT,
    MEM_TYPES,
    nixlBackendError,
    nixlInvalidParamError,
    nixlNoTelemetryError,
    nixlNotFoundError,
    nixlNotSupportedError,
    nixlRegDList,
    nixlRemoteDisconnectError,
    nixlRepostActiveError,
    nixlXferDList,
    nixlXferTelemetry,
)

# NIXL's backend plugins, and what each is on dmaplane: transfer backends use the agent's NICs
# (TCP or the simulated testbed); storage ones are not offered here.
_TRANSFER_BACKENDS = ("UCX", "UCCL", "LIBFABRIC", "MOONCAKE", "GPUNETIO", "UCX_MO", "DMAPLANE")
_STORAGE_BACKENDS = ("GDS", "GDS_MT", "POSIX", "OBJ", "HF3FS", "GUSLI")
# The tag dmaplane notifications carry for NIXL messages (the native request's).
_TAG = _native.NixlRequest.TAG


def _name(agent) -> str:
    """An agent name as ``str``: NIXL hands names out as ``bytes`` and takes either."""
    if isinstance(agent, (bytes, bytearray, memoryview)):
        return bytes(agent).decode()
    if isinstance(agent, str):
        return agent
    raise nixlInvalidParamError(f"agent name: expected str or bytes, got {type(agent).__name__}")


def _msg(notif) -> bytes:
    if notif is None:
        return b""
    if isinstance(notif, str):
        return notif.encode()
    return bytes(notif)


def _reraise(e: BaseException):
    """The NIXL exception for a dmaplane one, with it chained."""
    if isinstance(e, dmaplane.PeerLostError):
        raise nixlRemoteDisconnectError(str(e)) from e
    if isinstance(e, dmaplane.InvalidArgument):
        raise nixlInvalidParamError(str(e)) from e
    if isinstance(e, dmaplane.Error):
        raise nixlBackendError(str(e)) from e
    raise e


class nixl_thread_sync_t(Enum):
    """NIXL's thread synchronisation modes (dmaplane's agent is thread-safe in every mode)."""

    NIXL_THREAD_SYNC_NONE = nixlBind.NIXL_THREAD_SYNC_NONE
    NIXL_THREAD_SYNC_STRICT = nixlBind.NIXL_THREAD_SYNC_STRICT
    NIXL_THREAD_SYNC_RW = nixlBind.NIXL_THREAD_SYNC_RW
    NIXL_THREAD_SYNC_DEFAULT = nixlBind.NIXL_THREAD_SYNC_DEFAULT


class nixl_agent_config:
    """NIXL's agent configuration, plus where dmaplane runs the agent.

    NIXL's arguments are accepted with its defaults; ``capture_telemetry`` turns on
    ``get_xfer_telemetry``. dmaplane's: ``dmaplane_backend`` (``"tcp"``, the default, or
    ``"sim"``), ``testbed`` (a ``dmaplane.Testbed`` for ``"sim"``), ``nics``, ``listen``
    (``host:port`` of the handshake listener) and ``secret`` (bytes shared by the agents that
    may connect)."""

    def __init__(
        self,
        enable_prog_thread: bool = True,
        enable_listen_thread: bool = False,
        listen_port: int = DEFAULT_COMM_PORT,
        capture_telemetry: bool = False,
        num_threads: int = 0,
        backends: List[str] = ["UCX"],  # noqa: B006 — NIXL's signature
        sync_mode: Optional[nixl_thread_sync_t] = None,
        *,
        dmaplane_backend: str = "tcp",
        testbed=None,
        nics: Optional[List[str]] = None,
        listen: Optional[str] = None,
        secret: Optional[bytes] = None,
    ):
        if sync_mode is not None and not isinstance(sync_mode, nixl_thread_sync_t):
            raise TypeError(
                f"sync_mode must be a nixl_thread_sync_t (got {type(sync_mode).__name__!r})"
            )
        self.backends = list(backends)
        self.enable_pthread = enable_prog_thread
        self.enable_listen = enable_listen_thread
        self.port = listen_port
        self.capture_telemetry = capture_telemetry
        self.num_threads = num_threads
        self.sync_mode = sync_mode
        self.dmaplane_backend = dmaplane_backend
        self.testbed = testbed
        self.nics = nics
        self.listen = listen
        self.secret = secret


class nixl_prepped_dlist_handle:
    """A prepared descriptor list (``prep_xfer_dlist``): dmaplane blocks, local or a peer's."""

    __slots__ = ("_agent", "_blocks", "_peer", "_name", "_count", "_released")

    def __init__(self, agent, blocks, peer, count):
        self._agent = agent
        self._blocks = blocks
        self._peer = peer  # None: local
        self._name = None if peer is None else peer.name
        self._count = count
        self._released = False

    def release(self):
        self._released = True
        self._blocks = None

    def __len__(self):
        return self._count

    def __repr__(self):
        side = "local" if self._peer is None else f"remote {self._peer.name!r}"
        return f"nixl_prepped_dlist_handle({side}, {self._count} descs)"


# A transfer request (``make_prepped_xfer``, ``initialize_xfer``): a dmaplane prepared transfer,
# posted by ``transfer`` as often as wanted, one post at a time. It is native (Rust): a serving
# engine makes one per request and polls it in a loop, so none of that loop runs in Python but
# the facade's own calls.
nixl_xfer_handle = _native.NixlRequest


class nixl_agent:
    """NIXL's agent, on a dmaplane agent (``self.native``)."""

    def __init__(
        self,
        agent_name: str,
        nixl_conf: Optional[nixl_agent_config] = None,
        instantiate_all: bool = False,
    ):
        conf = nixl_conf or nixl_agent_config()
        self.name = _name(agent_name)
        self._conf = conf
        self._telemetry = bool(conf.capture_telemetry)
        kwargs = {}
        if conf.dmaplane_backend == "sim":
            kwargs["testbed"] = conf.testbed
        if conf.nics is not None:
            kwargs["nics"] = conf.nics
        if conf.listen is not None:
            kwargs["listen"] = conf.listen
        if conf.secret is not None:
            kwargs["secret"] = conf.secret
        try:
            self.native = dmaplane.Agent(self.name, backend=conf.dmaplane_backend, **kwargs)
        except dmaplane.Error as e:
            _reraise(e)
        self.backends: Dict[str, int] = {}
        self.backend_mems: Dict[str, List[str]] = {}
        self.backend_options: Dict[str, Dict[str, str]] = {}
        self.plugin_list = list(_TRANSFER_BACKENDS)
        self.notifs: Dict[str, List[bytes]] = {}
        self.nixl_mems = dict(MEM_TYPES)
        self.nixl_ops = {"WRITE": nixlBind.NIXL_WRITE, "READ": nixlBind.NIXL_READ}
        self._peers: Dict[str, object] = {}
        # Registered ranges, sorted by address: (addr, end, dev, mem_type, native Region).
        self._regs: List[Tuple[int, int, int, int, object]] = []
        self._starts: List[int] = []
        self._lock = threading.Lock()
        self._seq = 0
        for b in self.plugin_list if instantiate_all else conf.backends:
            self.create_backend(b)

    # ---- backends -------------------------------------------------------------------------

    def get_plugin_list(self) -> List[str]:
        return list(self.plugin_list)

    def get_plugin_mem_types(self, backend: str) -> List[str]:
        return ["DRAM"]

    def get_plugin_params(self, backend: str) -> Dict[str, str]:
        return {}

    def get_backend_mem_types(self, backend: str) -> List[str]:
        return self.backend_mems.get(backend, [])

    def get_backend_params(self, backend: str) -> Dict[str, str]:
        return self.backend_options.get(backend, {})

    def create_backend(self, backend: str, initParams: Dict[str, str] = {}):  # noqa: B006
        """Accept a NIXL transfer backend by name: every one maps to the agent's NICs. A
        storage backend is refused naming dmaplane's file API."""
        if backend in _STORAGE_BACKENDS:
            raise nixlNotSupportedError(
                f"backend {backend!r}: storage backends are not offered by dmaplane.nixl; use "
                "dmaplane.Agent.register_file / read_file (GPUDirect-Storage-style reads)"
            )
        if backend not in _TRANSFER_BACKENDS:
            raise nixlNotFoundError(
                f"backend {backend!r}: not a NIXL backend dmaplane.nixl knows "
                f"({', '.join(_TRANSFER_BACKENDS)})"
            )
        if backend not in self.backends:
            self.backends[backend] = len(self.backends) + 1
            self.backend_mems[backend] = ["DRAM"]
            self.backend_options[backend] = dict(initParams)
        return self.backends[backend]

    def _check_backends(self, backends):
        for b in backends or ():
            if b not in self.backends:
                raise nixlNotFoundError(
                    f"backend {b!r}: not created on agent {self.name!r} "
                    f"(created: {sorted(self.backends)})"
                )

    # ---- registration ---------------------------------------------------------------------

    def get_reg_descs(self, descs, mem_type: Optional[str] = None) -> nixlRegDList:
        """A registration list from tensors/arrays/buffers, ``(addr, len, dev, label)``
        tuples or an N×3 array (with ``mem_type``)."""
        if isinstance(descs, nixlRegDList):
            return descs
        if isinstance(descs, nixlXferDList):
            raise nixlInvalidParamError(
                "get_reg_descs: a transfer list was given; use a registration list"
            )
        objs = _objects(descs)
        if objs is not None:
            out = nixlRegDList(_obj_mem(objs))
            for o in objs:
                addr, length, dev = _obj_desc(o)
                out.descs.append((addr, length, dev, ""))
            out.objects = objs
            return out
        mt = self._mem(mem_type)
        rows = _table(descs, (4, 3), "registration")
        return nixlRegDList(mt, rows)

    def register_memory(
        self, reg_list, mem_type: Optional[str] = None, backends: List[str] = []  # noqa: B006
    ) -> nixlRegDList:
        """Register memory with the agent's NICs: objects are held until
        ``deregister_memory``; raw address rows must stay alive until then (the caller's
        promise, as in NIXL)."""
        self._check_backends(backends)
        reg = self.get_reg_descs(reg_list, mem_type)
        if reg.regions:
            raise nixlInvalidParamError("register_memory: this list is registered already")
        made = []
        try:
            if reg.objects:
                for o, (addr, length, dev, _) in zip(reg.objects, reg.descs):
                    r = self.native.register(o, name=_reg_name(reg.mem_type, dev, addr, length))
                    made.append((addr, length, dev, r))
            else:
                if reg.mem_type not in (nixlBind.DRAM_SEG, nixlBind.VRAM_SEG):
                    raise nixlNotSupportedError(
                        f"register_memory: mem_type {_mem_name(reg.mem_type)} by raw address: "
                        "dmaplane lends host (DRAM) and CUDA (VRAM) memory by address; use "
                        "dmaplane's register_file for files"
                    )
                for addr, length, dev, _ in reg.descs:
                    r = self.native.register_address(
                        addr,
                        length,
                        name=_reg_name(reg.mem_type, dev, addr, length),
                        owner_keeps_alive=True,
                        cuda=reg.mem_type == nixlBind.VRAM_SEG,
                    )
                    made.append((addr, length, dev, r))
        except dmaplane.Error as e:
            for *_, r in made:
                r.deregister()
            _reraise(e)
        except BaseException:
            for *_, r in made:
                r.deregister()
            raise
        with self._lock:
            for addr, length, dev, r in made:
                i = bisect.bisect_left(self._starts, addr)
                self._starts.insert(i, addr)
                self._regs.insert(i, (addr, addr + length, dev, reg.mem_type, r))
        reg.regions = [r for *_, r in made]
        return reg

    def deregister_memory(self, dereg_list: nixlRegDList, backends: List[str] = []):  # noqa: B006
        """Deregister: every transfer still using the memory ends (``nixlBackendError`` from
        a ``RevokedError``) before the memory is let go."""
        if not isinstance(dereg_list, nixlRegDList) or not dereg_list.regions:
            raise nixlNotFoundError("deregister_memory: the list was not registered here")
        regions = dereg_list.regions
        dereg_list.regions = []
        with self._lock:
            keep = [(s, t) for s, t in zip(self._starts, self._regs) if t[4] not in regions]
            self._starts = [s for s, _ in keep]
            self._regs = [t for _, t in keep]
        for r in regions:
            try:
                r.deregister()
            except dmaplane.Error as e:
                _reraise(e)

    def query_memory(self, reg_list, backend: str, mem_type: Optional[str] = None):
        reg = self.get_reg_descs(reg_list, mem_type)
        return [
            {"registered": "yes"} if self._find_local(a, n) is not None else None
            for a, n, _, _ in reg.descs
        ]

    def _mem(self, mem_type) -> int:
        if mem_type is None:
            raise nixlInvalidParamError("mem_type: needed for descriptor tuples or arrays")
        try:
            return MEM_TYPES[mem_type]
        except KeyError:
            raise nixlInvalidParamError(
                f"mem_type = {mem_type!r}: one of {sorted(MEM_TYPES)}"
            ) from None

    def _find_local(self, addr, length):
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start, end, _, _, r = self._regs[i]
        if addr + length <= end:
            return r, addr - start
        return None

    # ---- descriptor lists -----------------------------------------------------------------

    def get_xfer_descs(self, descs, mem_type: Optional[str] = None) -> nixlXferDList:
        """A transfer list from tensors/arrays, ``(addr, len, dev)`` tuples or an N×3 array."""
        if isinstance(descs, nixlXferDList):
            return descs
        if isinstance(descs, nixlRegDList):
            raise nixlInvalidParamError(
                "get_xfer_descs: a registration list was given; use reg_list.trim()"
            )
        objs = _objects(descs)
        if objs is not None:
            return nixlXferDList(_obj_mem(objs), [_obj_desc(o) for o in objs])
        return nixlXferDList(self._mem(mem_type), _table(descs, (3,), "transfer"))

    def prep_xfer_dlist(
        self,
        agent_name,
        xfer_list,
        mem_type: Optional[str] = None,
        backends: List[str] = [],  # noqa: B006
    ) -> nixl_prepped_dlist_handle:
        """Prepare a descriptor list once, for transfers by index: local
        (``"NIXL_INIT_AGENT"``) or a remote agent's (its name). N×5 arrays (address, len,
        dev, stride, count) are strided lists and need ``mem_type``."""
        self._check_backends(backends)
        name = _name(agent_name)
        rows = _strided(xfer_list, mem_type, self._mem)
        if rows is None:
            rows = self.get_xfer_descs(xfer_list, mem_type).descs
        if name in ("", nixlBind.NIXL_INIT_AGENT):
            descs = []
            for addr, length, _dev in rows:
                hit = self._find_local(addr, length)
                if hit is None:
                    raise nixlNotFoundError(
                        f"prep_xfer_dlist: local descriptor ({addr:#x}, {length}) is not inside "
                        f"memory registered on agent {self.name!r}"
                    )
                r, off = hit
                descs.append(r[off : off + length])
            return nixl_prepped_dlist_handle(self, _native.LocalBlocks(descs), None, len(descs))
        if name == self.name:
            raise nixlNotSupportedError(
                "prep_xfer_dlist: loopback (this agent's own name) is not offered by "
                "dmaplane.nixl; transfers go between two agents"
            )
        peer = self._peer(name)
        regions = sorted(
            (info for info in (_parse_reg_name(r) for r in peer.regions()) if info is not None),
            key=lambda t: t[0],
        )
        starts = [t[0] for t in regions]
        descs = []
        for addr, length, _dev in rows:
            i = bisect.bisect_right(starts, addr) - 1
            if i < 0 or addr + length > regions[i][1]:
                raise nixlNotFoundError(
                    f"prep_xfer_dlist: remote descriptor ({addr:#x}, {length}) is not inside "
                    f"memory agent {name!r} registered"
                )
            start, _, rr = regions[i]
            off = addr - start
            descs.append(rr[off : off + length])
        return nixl_prepped_dlist_handle(self, _native.RemoteBlocks(descs), peer, len(descs))

    def release_dlist_handle(self, handle: nixl_prepped_dlist_handle):
        handle.release()

    # ---- transfers ------------------------------------------------------------------------

    def make_prepped_xfer(
        self,
        operation: str,
        local_xfer_side: nixl_prepped_dlist_handle,
        local_indices,
        remote_xfer_side: nixl_prepped_dlist_handle,
        remote_indices,
        notif_msg: bytes = b"",
        backends: List[str] = [],  # noqa: B006
        skip_desc_merge: bool = False,
    ) -> nixl_xfer_handle:
        """A transfer request from prepared lists by index (lists or int32/int64 arrays),
        checked and split into requests once; ``transfer`` posts it."""
        if backends:
            self._check_backends(backends)
        peer = remote_xfer_side._peer
        if (
            local_xfer_side._released
            or remote_xfer_side._released
            or peer is None
            or local_xfer_side._peer is not None
            or self._peers.get(remote_xfer_side._name) is not peer
        ):
            self._refuse_sides(local_xfer_side, remote_xfer_side)
        try:
            return nixl_xfer_handle(
                self.native, operation, peer, local_xfer_side._blocks, local_indices,
                remote_xfer_side._blocks, remote_indices, notif_msg, self._telemetry,
            )
        except dmaplane.Error as e:
            _reraise(e)

    def _refuse_sides(self, local, remote):
        if local._released or remote._released:
            raise nixlInvalidParamError("make_prepped_xfer: a descriptor list was released")
        if remote._peer is None or local._peer is not None:
            raise nixlInvalidParamError(
                "make_prepped_xfer: the local side must be prepared with NIXL_INIT_AGENT and "
                "the remote side with the remote agent's name"
            )
        raise nixlNotFoundError(
            f"make_prepped_xfer: remote agent {remote._peer.name!r} was removed"
        )

    def initialize_xfer(
        self,
        operation: str,
        local_descs,
        remote_descs,
        remote_agent,
        notif_msg: bytes = b"",
        backends: List[str] = [],  # noqa: B006
    ) -> nixl_xfer_handle:
        """``prep_xfer_dlist`` of both sides and ``make_prepped_xfer`` of every descriptor."""
        local = self.prep_xfer_dlist(nixlBind.NIXL_INIT_AGENT, local_descs, backends=backends)
        remote = self.prep_xfer_dlist(remote_agent, remote_descs, backends=backends)
        if len(local) != len(remote):
            raise nixlInvalidParamError(
                f"initialize_xfer: {len(local)} local descriptors, {len(remote)} remote"
            )
        idx = list(range(len(local)))
        return self.make_prepped_xfer(operation, local, idx, remote, idx, notif_msg, backends)

    def transfer(self, handle: nixl_xfer_handle, notif_msg: bytes = b"") -> str:
        """Post the request (again, once its last post ended): ``"PROC"``, or ``"DONE"`` when
        it already completed. The peer gets ``notif_msg`` (or the request's) after the data."""
        try:
            s = handle._post(notif_msg)
        except dmaplane.Error as e:
            _reraise(e)
        if s is None:
            raise nixlRepostActiveError(
                "transfer: the request's last post is still in progress; wait for DONE first"
            )
        return s

    def check_xfer_state(self, handle: nixl_xfer_handle) -> str:
        """``"PROC"`` while it moves, ``"DONE"`` once every byte landed. A revoke or a lost
        peer raises the NIXL exception with dmaplane's chained."""
        try:
            s = handle._state()
        except dmaplane.Error as e:
            _reraise(e)
        if s is None:
            raise nixlBind.nixlNotPostedError("check_xfer_state: the request was not posted")
        return s

    def get_xfer_telemetry(self, handle: nixl_xfer_handle) -> nixlXferTelemetry:
        if not self._telemetry:
            raise nixlNoTelemetryError(
                "get_xfer_telemetry: telemetry is off; nixl_agent_config(capture_telemetry=True)"
            )
        t = handle._telemetry()
        if t is None:
            raise nixlBind.nixlNotPostedError("get_xfer_telemetry: the request was not posted")
        start, post_us, xfer_us, total, descs = t
        return nixlXferTelemetry(
            startTime=start,
            postDuration=post_us,
            xferDuration=xfer_us,
            totalBytes=total,
            descCount=descs,
        )

    def query_xfer_backend(self, handle: nixl_xfer_handle) -> str:
        return next(iter(self.backends), "UCX")

    def estimate_xfer_cost(self, req_handle: nixl_xfer_handle):
        raise nixlNotSupportedError("estimate_xfer_cost: dmaplane.nixl gives no cost estimate")

    def release_xfer_handle(self, handle: nixl_xfer_handle):
        """Let the request go. A post still in progress runs to its end (dmaplane cannot
        cancel a posted transfer; it owes every request its completion)."""
        handle.release()

    # ---- notifications --------------------------------------------------------------------

    def _drain(self, into: Dict[str, List[bytes]]):
        for n in self.native.notifications():
            into.setdefault(n.sender, []).append(n.data)
        return into

    def get_new_notifs(self, backends: List[str] = []) -> Dict[str, List[bytes]]:  # noqa: B006
        """Notifications that came since the last call: agent name → list of messages."""
        return self._drain({})

    def update_notifs(self, backends: List[str] = []) -> Dict[str, List[bytes]]:  # noqa: B006
        """Like ``get_new_notifs``, accumulated in ``self.notifs``."""
        return self._drain(self.notifs)

    def check_remote_xfer_done(
        self,
        remote_agent_name,
        lookup_tag: bytes,
        backends: List[str] = [],  # noqa: B006
        tag_is_prefix=True,
    ) -> bool:
        """Whether a notification from the agent starting with (or containing) the tag came;
        the one found is removed."""
        self._drain(self.notifs)
        name = _name(remote_agent_name)
        tag = _msg(lookup_tag)
        msgs = self.notifs.get(name, [])
        for i, m in enumerate(msgs):
            if (m.startswith(tag) if tag_is_prefix else tag in m):
                del msgs[i]
                return True
        return False

    def send_notif(self, remote_agent_name, notif_msg: bytes, backend: Optional[str] = None):
        """A notification on its own, not bound to a transfer."""
        peer = self._peer(_name(remote_agent_name))
        try:
            self.native.notify(peer, _TAG, _msg(notif_msg))
        except dmaplane.Error as e:
            _reraise(e)

    # ---- metadata and peers ---------------------------------------------------------------

    def get_agent_metadata(self) -> bytes:
        return self.native.metadata()

    def get_partial_agent_metadata(self, descs, inc_conn_info=False, backends=[]):  # noqa: B006
        return self.native.metadata()

    def add_remote_agent(self, metadata: bytes) -> bytes:
        """Connect to the agent the metadata describes; its name, as ``bytes`` (as NIXL's
        binding returns it)."""
        try:
            peer = self.native.connect(bytes(metadata))
        except dmaplane.Error as e:
            _reraise(e)
        self._peers[peer.name] = peer
        return peer.name.encode()

    def remove_remote_agent(self, agent):
        name = _name(agent)
        if self._peers.pop(name, None) is None:
            raise nixlNotFoundError(f"remove_remote_agent: no remote agent {name!r}")

    def check_remote_metadata(self, agent, descs=None) -> bool:
        name = _name(agent)
        peer = self._peers.get(name)
        if peer is None:
            return False
        if descs is None:
            return True
        try:
            self.prep_xfer_dlist(name, descs)
        except nixlBind.nixlError:
            return False
        return True

    def make_connection(self, remote_agent, backends: List[str] = []):  # noqa: B006
        self._peer(_name(remote_agent))

    def _peer(self, name):
        peer = self._peers.get(name)
        if peer is None:
            raise nixlNotFoundError(
                f"remote agent {name!r} is not known to {self.name!r}: add_remote_agent first"
            )
        if peer.lost() is not None:
            raise nixlRemoteDisconnectError(f"remote agent {name!r} was lost: {peer.lost()}")
        return peer

    def send_local_metadata(self, ip_addr: str = "", port: int = DEFAULT_COMM_PORT):
        raise nixlNotSupportedError(
            "send_local_metadata: dmaplane.nixl exchanges metadata as bytes "
            "(get_agent_metadata / add_remote_agent); there is no metadata server"
        )

    fetch_remote_metadata = send_local_metadata
    send_partial_agent_metadata = send_local_metadata
    invalidate_local_metadata = send_local_metadata

    def get_serialized_descs(self, descs) -> bytes:
        import pickle

        return pickle.dumps((descs.mem_type, list(descs)))

    def deserialize_descs(self, serialized_descs: bytes):
        import pickle

        mem_type, rows = pickle.loads(serialized_descs)
        if rows and len(rows[0]) == 4:
            return nixlRegDList(mem_type, rows)
        return nixlXferDList(mem_type, rows)
