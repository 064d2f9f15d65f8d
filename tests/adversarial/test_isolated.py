"""Runs the probes that could crash the interpreter or allocate without bound
(fuzz_ops.py, fuzz_stream_files.py) in a child pytest under an address-space limit: a
segfault, an abort or a runaway allocation fails this test with the child's output instead
of taking the run or the machine down."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
LIMIT = 16 << 30
"""Address space of the child: torch's CUDA build maps a few GB at import; a header that
made the loader allocate what it declares (20 GB and up) fails instead."""


def _limit() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def run_isolated(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "BMOJO_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    return subprocess.run(
        [sys.executable, *args], cwd=HERE.parent.parent, env=env, preexec_fn=_limit,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fuzz_ops.py", "fuzz_stream_files.py"])
def test_fuzz_in_child(module):
    proc = run_isolated(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(HERE / module)])
    out = (proc.stdout + proc.stderr)[-8000:]
    assert proc.returncode == 0, f"{module}: child exited {proc.returncode}\n{out}"


def test_limit_catches_a_runaway_allocation():
    """The guard works: a child that allocates far beyond the limit fails cleanly."""
    proc = run_isolated(["-c", "import torch; torch.empty(2**40, dtype=torch.uint8).fill_(1)"])
    assert proc.returncode != 0
    assert "memory" in (proc.stdout + proc.stderr).lower()
