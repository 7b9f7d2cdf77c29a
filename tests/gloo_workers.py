"""Run a worker script as R processes of a gloo process group on loopback (multi-process tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: Path, args_of_rank, world: int = 2, timeout: float = 120) -> list[str]:  # type: ignore[no-untyped-def]
    """Start ``python script *args_of_rank(rank, port)`` for every rank, wait, return their logs.

    The repository root and ``tests/`` are on ``PYTHONPATH`` and gloo uses the loopback interface. Fails the test
    when a worker exits non-zero or the workers do not finish within ``timeout`` seconds (deadlock).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args_of_rank(r, port))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out (deadlock?)")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return logs
