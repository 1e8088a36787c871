"""Bounded Hub calls: connect/read timeouts for huggingface_hub's shared HTTP client.

Below checkpoint (which downloads) and hub (which pushes): both bound their calls with it.
"""

from __future__ import annotations

import os

from .errors import InputError

# Every Hub call is bounded (huggingface_hub's own client waits forever on a server that
# accepts the connection and never answers). Seconds; the environment overrides them.
CONNECT_TIMEOUT, READ_TIMEOUT = 10.0, 60.0
_CONNECT_ENV, _READ_ENV = "VLMGUARD_HUB_CONNECT_TIMEOUT", "VLMGUARD_HUB_READ_TIMEOUT"


def timeouts() -> tuple[float, float]:
    """(connect, read) seconds: the defaults, or the environment's."""
    values = []
    for name, default in ((_CONNECT_ENV, CONNECT_TIMEOUT), (_READ_ENV, READ_TIMEOUT)):
        try:
            value = float(os.environ.get(name, default))
        except ValueError as exc:
            raise InputError(f"{name} must be a number of seconds") from exc
        if not value > 0:
            raise InputError(f"{name} must be a positive number of seconds")
        values.append(value)
    return values[0], values[1]


def bound_hub_calls() -> None:
    """Give huggingface_hub's shared HTTP client connect/read timeouts (every call after this;
    a call with its own timeout, such as a download, keeps it)."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    connect, read = timeouts()

    def factory():
        client = _http.default_client_factory()
        client.timeout = type(client.timeout)(read, connect=connect)
        return client

    set_client_factory(factory)
