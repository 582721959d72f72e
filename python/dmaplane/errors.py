"""dmaplane's exceptions: one class per way a call can fail, with the fields a caller branches
on as attributes. Never integer codes or strings to compare."""

import builtins


class Error(Exception):
    """Every dmaplane error. ``str(e)`` names the agent, peer, region or field concerned."""

    def __init__(self, message, **attrs):
        super().__init__(message)
        for k, v in attrs.items():
            setattr(self, k, v)


class InvalidArgument(Error, ValueError):
    """A caller's value is wrong. ``field``: the parameter; ``value``: what was given;
    ``why``: what is accepted."""

    field: str
    value: str
    why: str


class RegistrationError(Error):
    """The memory could not be registered (no NIC reaches it, the kernel refused it, ...)."""


class NegotiationError(RegistrationError):
    """No offer of the memory's exporter was accepted by an importer (a NIC that cannot reach
    the memory, an access or route it refuses). ``exporter``, ``importer``; ``refusals``: each
    refused offer with every accept's reasons, in words."""

    exporter: str
    importer: str
    refusals: list


class RevokedError(Error):
    """The memory a transfer touches was revoked, freed or deregistered — nothing was lost,
    and nothing touched it after the owner's ack. ``side``: ``"local"`` or ``"remote"``;
    ``region``: the registration id on that side; ``name``: its memory's name; ``epoch``: the
    export epoch revoked."""

    side: str
    region: int
    name: str
    epoch: int


class PeerLostError(Error):
    """The peer went away. ``peer``: its name; ``why``: how its connection ended."""

    peer: str


class StalledError(Error):
    """A transfer made no progress for the agent's stall timeout."""

    transfer: int
    peer: str


class TimeoutError(Error, builtins.TimeoutError):
    """A wait gave up after its timeout (the transfer goes on: wait again)."""

    transfer: int
    peer: str


class ConnectError(Error):
    """The handshake with a peer failed, or its metadata blob cannot be read."""


class TransferError(Error):
    """A request of a transfer failed for a reason other than a revoke or a lost peer."""


__all__ = [
    "Error",
    "InvalidArgument",
    "RegistrationError",
    "NegotiationError",
    "RevokedError",
    "PeerLostError",
    "StalledError",
    "TimeoutError",
    "ConnectError",
    "TransferError",
]
