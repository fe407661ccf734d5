"""free_port hands out ports that outgoing connections will not take before the server binds
(xllm_plugin/launcher/engine.py)."""

from __future__ import annotations

import random
import socket

import pytest

from xllm_plugin.launcher import engine
from xllm_plugin.launcher.engine import PORT_FLOOR, ephemeral_port_floor, free_port


def test_ports_come_from_below_the_ephemeral_range_and_never_twice() -> None:
    ceiling = ephemeral_port_floor()
    if ceiling - PORT_FLOOR < 1000:
        pytest.skip(f"ephemeral range starts at {ceiling}: no room below it")
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(PORT_FLOOR <= port < ceiling for port in ports)


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    if ephemeral_port_floor() - PORT_FLOOR < 1000:
        pytest.skip("no room below the ephemeral range")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken, taken, PORT_FLOOR + 123])
        monkeypatch.setattr(random, "randrange", lambda lo, hi: next(picks))
        monkeypatch.setattr(engine, "_handed_out", set())
        assert free_port() == PORT_FLOOR + 123


def test_without_room_below_the_range_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "ephemeral_port_floor", lambda: PORT_FLOOR + 10)
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free, as promised
    assert port > 0
