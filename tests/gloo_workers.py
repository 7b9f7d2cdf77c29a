"""Run a worker script as R processes of a gloo process group on loopback (multi-process tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# torch 2.13's gloo sometimes aborts a process with this message (std::terminate from a thread left
# joinable), measured about 1 run in 10 of a 2-rank group on this machine, before and after
# destroy_process_group; a group that fails only so is run once more, any other failure fails.
GLOO_ABORT = "terminate called without an active exception"


def gloo_aborted(returncode: int, log: str) -> bool:
    """True when a worker (or torchrun) failed only by gloo's spurious abort (see ``GLOO_ABORT``)."""
    return returncode != 0 and GLOO_ABORT in log


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
    for attempt in (1, 2):
        procs, logs = _start_and_wait(script, args_of_rank, world, timeout)
        failed = [(p.returncode, log) for p, log in zip(procs, logs) if p.returncode != 0]
        if not failed or attempt == 2 or not all(gloo_aborted(rc, log) for rc, log in failed):
            break
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return logs


def _start_and_wait(
    script: Path, args_of_rank, world: int, timeout: float
) -> tuple[list[subprocess.Popen[str]], list[str]]:  # type: ignore[no-untyped-def]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    )
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *map(str, args_of_rank(r, port))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out (deadlock?)")
    return procs, logs
