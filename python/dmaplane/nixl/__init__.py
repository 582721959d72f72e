"""NIXL's Python interface on dmaplane: ``from dmaplane.nixl._api import nixl_agent,
nixl_agent_config`` in place of ``from nixl._api import ...``. See ``dmaplane.nixl._api`` for
what differs from NIXL and why."""

from ._api import (
    DEFAULT_COMM_PORT,
    nixl_agent,
    nixl_agent_config,
    nixl_prepped_dlist_handle,
    nixl_thread_sync_t,
    nixl_xfer_handle,
)

nixl_backend_handle = int

__all__ = [
    "DEFAULT_COMM_PORT",
    "nixl_agent",
    "nixl_agent_config",
    "nixl_backend_handle",
    "nixl_prepped_dlist_handle",
    "nixl_thread_sync_t",
    "nixl_xfer_handle",
]
