"""Ports for the servers the project starts: free, and out of the way of outgoing connections."""

from __future__ import annotations

import socket

import pytest

from airflow_mlops import net


def test_a_free_port_is_outside_the_ephemeral_range_and_a_server_can_listen_on_it():
    low = int(net.EPHEMERAL_RANGE.read_text().split()[0])
    for _ in range(20):
        port = net.free_port()
        assert net.SERVER_PORTS[0] <= port < low
        with socket.socket() as server:
            # as the servers do (uvicorn, BentoML): a port whose last connections are in TIME_WAIT, left by a
            # server another test stopped, is free to them; a bind without it fails (CI of h-stage)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()


def test_a_port_in_use_is_never_given_and_a_full_range_is_an_error(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", net.free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(net, "SERVER_PORTS", (port, port + 1))
        assert net.free_port() == port + 1, "the port in use was given"
        with socket.socket() as next_one:
            next_one.bind(("127.0.0.1", port + 1))
            next_one.listen()
            with pytest.raises(OSError, match=f"no free port on 127.0.0.1 between {port} and {port + 1}"):
                net.free_port()
