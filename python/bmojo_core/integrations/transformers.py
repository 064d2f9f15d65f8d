"""Run transformers' Mamba-family models on bmojo_core's kernels with one call.

transformers (≥ 5) gives each Mamba-family modeling module a few module-level kernel hooks
(``causal_conv1d_fn``, ``causal_conv1d_update``, ``mamba_selective_scan``, ...) that its
mixers look up at call time: the peer package when it is installed, else a pure-torch
fallback. :func:`enable` replaces those hooks with bmojo_core's ops in every installed
module of the family; :func:`disable` puts the originals back; :func:`use_bmojo_core` is
the context manager. Both are idempotent.

Which modules and hooks exist is discovered from the installed transformers (a module is
patched only where it exists and only for the hook names it defines): the Mamba-1 family
(Mamba, FalconMamba, Jamba, Zamba: the causal convolution, the selective scan and the
decode step) and the Mamba-2 family (Mamba2, Zamba2, Bamba, GraniteMoeHybrid, FalconH1,
NemotronH: the causal convolution, the SSD scan, Mamba-2's fused training block
:func:`~bmojo_core.ops.ssd.mamba_split_conv1d_scan_combined` and the heads-layout decode
step). Mamba-1's fused training path ``mamba_inner_fn`` runs
:func:`~bmojo_core.ops.inner.mamba_inner_fn`, except for FalconMamba's variant with RMS
norms on B, C and Δ (``b_rms_weight``, ...): there transformers' torch path normalises Δ's
low-rank input before its projection while mamba_ssm's kernel normalises after it, so the
hook declines by returning None — transformers' documented fallback, its own torch version
does the same — and the mixer runs its unfused path on our conv and scan, with autograd.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..ops.conv import causal_conv1d_fn, causal_conv1d_update
from ..ops.inner import mamba_inner_fn
from ..ops.scan import selective_scan_fn
from ..ops.ssd import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
from ..ops.step import selective_state_update

__all__ = [
    "MAMBA1_MODELS",
    "MAMBA2_MODELS",
    "Report",
    "disable",
    "enable",
    "status",
    "use_bmojo_core",
]

MAMBA1_MODELS = ("mamba", "falcon_mamba", "jamba", "zamba")
"""transformers model folders whose mixers follow Mamba-1 (routed by :func:`enable`)."""
MAMBA2_MODELS = ("mamba2", "zamba2", "bamba", "granitemoehybrid", "falcon_h1", "nemotron_h")
"""transformers model folders whose mixers follow Mamba-2 (routed by :func:`enable`)."""


# ----------------------------------------------------------------------------- hooks
# Each accepts the keywords transformers' mixers pass (and ignores the ones that only
# choose among its own torch paths).


def _selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                    delta_softplus=False, return_last_state=False, **_: Any):  # fmt: skip
    return selective_scan_fn(
        hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


def _selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None,
                            dt_softplus=False, z=None, **_: Any):  # fmt: skip
    return selective_state_update(state, hidden_states, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _conv_fn(hidden_states, weight, bias=None, activation=None, seq_idx=None, **_: Any):
    return causal_conv1d_fn(hidden_states, weight, bias, seq_idx=seq_idx, activation=activation)


def _conv_update(hidden_states, conv_state, weight, bias=None, activation=None, **_: Any):
    return causal_conv1d_update(hidden_states, conv_state, weight, bias, activation)


def _inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
              out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
              delta_softplus=True, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
              b_c_dt_rms_eps=1e-6, **_: Any):  # fmt: skip
    """Mamba-1's fused training path on :func:`mamba_inner_fn`; None (transformers' way to
    decline: the mixer runs its unfused path, on our ops) for FalconMamba's normed
    variant, whose Δ norm transformers places before the projection (see module doc)."""
    if any(w is not None for w in (b_rms_weight, c_rms_weight, dt_rms_weight)):
        return None
    return mamba_inner_fn(
        xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
        out_proj_bias, A, B, C, D, delta_bias, delta_softplus=delta_softplus,
    )  # fmt: skip


def _chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=False,
                dt_limit=(0.0, math.inf), return_final_states=False,
                return_varlen_states=False, **_: Any):  # fmt: skip
    return mamba_chunk_scan_combined(
        hidden_states, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
        cu_seqlens, dt_softplus, tuple(dt_limit), return_final_states, return_varlen_states,
    )  # fmt: skip


def _split_conv_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                     initial_states=None, seq_idx=None, dt_limit=(0.0, math.inf),
                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                     ngroups=1, norm_before_gate=True, **_: Any):  # fmt: skip
    return mamba_split_conv1d_scan_combined(
        zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states,
        seq_idx, tuple(dt_limit), return_final_states, activation, rmsnorm_weight,
        rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate,
    )  # fmt: skip


MAMBA1_HOOKS = {
    "causal_conv1d_fn": _conv_fn,
    "causal_conv1d_update": _conv_update,
    "mamba_inner_fn": _inner_fn,
    "mamba_selective_scan": _selective_scan,
    "mamba_selective_state_update": _selective_state_update,
}

MAMBA2_HOOKS = {
    "causal_conv1d_fn": _conv_fn,
    "causal_conv1d_update": _conv_update,
    "mamba2_chunk_scan": _chunk_scan,
    "mamba2_selective_state_update": _selective_state_update,
    "mamba2_split_conv1d_scan_combined": _split_conv_scan,
}


# ----------------------------------------------------------------------------- state


@dataclass
class Report:
    """What :func:`enable` did: ``patched`` maps each module to the hooks now on
    bmojo_core; ``pending`` lists installed modules left on transformers' functions (and
    why); ``missing`` the family models this transformers does not have."""

    patched: dict[str, list[str]] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{m}: {', '.join(h)}" for m, h in self.patched.items()]
        lines += [f"{m}: not routed ({why})" for m, why in self.pending.items()]
        if self.missing:
            lines.append(f"not in this transformers: {', '.join(self.missing)}")
        return "\n".join(lines)


_ORIGINALS: dict[tuple[str, str], Any] = {}
"""(module, hook) → the function transformers had there before :func:`enable`."""


def _module(model: str):
    try:
        return importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    except ImportError:
        return None


def enable() -> Report:
    """Routes every installed Mamba-family modeling module of transformers to
    bmojo_core (see the module doc) and reports what it patched. Calling it twice is
    harmless. Raises ``ImportError`` when transformers is not installed, or when it refuses
    the installed torch (it then runs without PyTorch models, so there is nothing to route)."""
    transformers = importlib.import_module("transformers")
    if not transformers.utils.is_torch_available():
        import torch

        raise ImportError(
            f"transformers {transformers.__version__} does not support the installed torch "
            f"{torch.__version__} (it disabled its PyTorch models); install a transformers "
            "release that supports this torch, or a newer torch"
        )
    report = Report()
    for models, hooks in ((MAMBA1_MODELS, MAMBA1_HOOKS), (MAMBA2_MODELS, MAMBA2_HOOKS)):
        for model in models:
            mod = _module(model)
            if mod is None:
                report.missing.append(model)
                continue
            done = []
            for name, fn in hooks.items():
                if not hasattr(mod, name):
                    continue
                key = (mod.__name__, name)
                if key not in _ORIGINALS:
                    _ORIGINALS[key] = getattr(mod, name)
                setattr(mod, name, fn)
                done.append(name)
            if done:
                report.patched[mod.__name__] = done
            else:
                report.pending[mod.__name__] = "defines none of the known kernel hooks"
    return report


def disable() -> None:
    """Puts back every function :func:`enable` replaced (harmless when nothing is)."""
    _restore(set(_ORIGINALS))


def _restore(keys: set[tuple[str, str]]) -> None:
    """Puts back the original functions of ``keys`` (module, hook) and forgets them."""
    for modname, name in keys:
        setattr(importlib.import_module(modname), name, _ORIGINALS.pop((modname, name)))


def status() -> dict[str, list[str]]:
    """The hooks currently routed to bmojo_core, by module."""
    out: dict[str, list[str]] = {}
    for modname, name in _ORIGINALS:
        out.setdefault(modname, []).append(name)
    return out


@contextlib.contextmanager
def use_bmojo_core() -> Iterator[Report]:
    """``with use_bmojo_core(): ...`` runs the block with :func:`enable` and restores the
    previous routing afterwards."""
    before = set(_ORIGINALS)
    report = enable()
    try:
        yield report
    finally:
        _restore(set(_ORIGINALS) - before)
