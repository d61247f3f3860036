"""The test servers' port choice: one that Ray's own processes cannot take before the proxy binds it."""

from __future__ import annotations

import socket

from .serve_helpers import _FIRST_FREE_PORT, ephemeral_port_range, free_port


def test_a_test_server_port_is_free_and_outside_what_the_kernel_or_ray_workers_hand_out():
    low, _ = ephemeral_port_range()
    for _ in range(20):
        port = free_port()
        assert _FIRST_FREE_PORT <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
