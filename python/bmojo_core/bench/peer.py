"""Peer cases (group ``peer``): other implementations measured in the same run when
importable; today mamba_ssm's pure-torch CPU path
(``mamba_ssm.ops.selective_scan_interface.selective_scan_ref``), forward, at the first
shape of the ``scan`` group.
"""

from __future__ import annotations

from typing import Any

from .harness import Case
from .scan import (
    SCAN_SHAPES,
    SCAN_SHAPES_QUICK,
    bmojo_scan,
    finish_parity_fwd,
    fwd,
    make_scan_inputs,
    shape_name,
)

__all__ = ["peer_available", "peer_cases"]


def peer_available() -> bool:
    """Whether mamba_ssm's reference scan can be imported here."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def peer_cases(quick: bool) -> list[Case]:
    batch, dim, N, L = (SCAN_SHAPES_QUICK if quick else SCAN_SHAPES)[0]
    shape = shape_name(batch, dim, N, L)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA-only install
        selective_scan_ref = None

    def peer(**kw: Any) -> Any:
        if selective_scan_ref is None:
            raise ImportError("mamba_ssm is not installed")
        return selective_scan_ref(**kw)

    return [
        Case(
            name=f"peer mamba_ssm selective_scan_ref fwd {shape}",
            group="peer",
            description="forward vs mamba_ssm's pure-torch CPU path",
            setup=lambda: make_scan_inputs(batch, dim, N, L),
            bmojo=fwd(bmojo_scan),
            reference=fwd(peer),
            reference_label="mamba_ssm.selective_scan_ref",
            repeat=7,
            updates=batch * dim * N * L,
            tokens=batch * L,
            finish=finish_parity_fwd,
            params={"batch": batch, "dim": dim, "N": N, "L": L, "available": peer_available()},
        )
    ]
