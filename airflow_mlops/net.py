"""Ports for the servers the project starts on this machine (model servers, routers, the demo's Airflow)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Where :func:`free_port` looks: above Ray's default worker ports (10002-19999), below the kernel's
#: ephemeral range (Linux default 32768-60999).
SERVER_PORTS = (20000, 32767)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to on ``host`` now, for a server started next.

    Taken outside the kernel's ephemeral range: a port the kernel hands out (``bind(0)``) is also what
    every outgoing connection gets as its local port, so a server told to use it can find it taken by
    a client connection in the moment between the check and its own ``bind``.
    """
    low, high = SERVER_PORTS[0], min(SERVER_PORTS[1], _ephemeral_low() - 1)
    for _ in range(200):
        port = random.randint(low, high) if high > low else 0
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError(f"no free port on {host} between {low} and {high}")
