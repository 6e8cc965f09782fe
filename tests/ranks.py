"""Two (or more) ranks of one command, started the way ``torchrun`` starts them but without its
launcher process: each gets RANK, WORLD_SIZE, LOCAL_RANK and a free MASTER_PORT on loopback.
The launcher itself is tested by the tests that run ``python -m torch.distributed.run``; the
others use this to spend their time on the ranks' work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(args: Sequence[str], cwd: Path, n: int = 2, timeout: float = 240
              ) -> subprocess.CompletedProcess:
    """``python ARGS`` as ``n`` ranks; the result has the largest return code and every
    rank's stdout and stderr, rank 0 first (bytes)."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(n)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return subprocess.CompletedProcess(
        args, max(p.returncode for p in procs), b"".join(o for o, _ in outs),
        b"".join(e for _, e in outs))
