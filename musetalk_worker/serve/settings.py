"""The server's own options (address, token, queue) and the rule for when a token is required."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Optional

TOKEN_ENV = "MUSETALK_API_TOKEN"


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What ``python -m musetalk_worker.serve`` was started with, besides the worker's settings.

    Attributes:
        host: address to listen on (loopback unless a token is set).
        port: TCP port.
        token: every request must send ``Authorization: Bearer <token>``; None: no check.
        queue: requests that may wait behind the running job before more get 429.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    token: Optional[str] = dataclasses.field(default=None, repr=False)
    queue: int = 4

    def bind_problem(self) -> Optional[str]:
        """Why the server must not start on this address, or None."""
        if self.token is None and not is_loopback(self.host):
            return (f"refusing to listen on {self.host} without a token: anyone who can reach port {self.port} "
                    f"could run jobs on this machine. Pass --token (or set {TOKEN_ENV}), or listen on 127.0.0.1.")
        return None


def is_loopback(host: Optional[str]) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything
