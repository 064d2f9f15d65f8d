"""The Mamba-1 mixer as an ``nn.Module`` on bmojo_core's causal conv and selective scan."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import int_arg
from ..inference.state import Piece, allocate
from ..ops.conv import causal_conv1d_fn, causal_conv1d_update
from ..ops.decode import linear
from ..ops.scan import selective_scan_fn
from ..ops.step import selective_state_update

__all__ = ["SelectiveSSM"]


class SelectiveSSM(nn.Module):
    """Mamba-1 mixer: ``(batch, L, d_model) → (batch, L, d_model)``: in_proj, depthwise
    causal conv + SiLU, x_proj → (Δ, B, C), dt_proj, selective scan with z gate, out_proj.

    ``d_inner = expand · d_model``; ``dt_rank = ceil(d_model / 16)`` by default. Init as
    Mamba: dt_proj weight uniform ±dt_rank^-½, its bias the inverse softplus of Δ drawn
    log-uniformly in ``[dt_min, dt_max]`` (floored at ``dt_init_floor``), ``A_log =
    log(1..N)`` (S4D-real), ``D = 1``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model = int_arg("d_model", d_model, 1)
        self.d_state = int_arg("d_state", d_state, 1)
        self.d_conv = int_arg("d_conv", d_conv, 1)
        self.d_inner = int_arg("expand", expand, 1) * d_model
        self.dt_rank = (
            math.ceil(d_model / 16) if dt_rank is None else int_arg("dt_rank", dt_rank, 1)
        )
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias, **fk)
        conv = nn.Conv1d(di, di, d_conv, groups=di, bias=conv_bias, **fk)  # for its init
        self.conv_weight = nn.Parameter(conv.weight.detach()[:, 0, :].clone())
        self.conv_bias = nn.Parameter(conv.bias.detach().clone()) if conv_bias else None
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True, **fk)
        with torch.no_grad():
            std = self.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(
                torch.rand(di, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, d_state + 1, dtype=torch.float64).repeat(di, 1)
        self.A_log = nn.Parameter(torch.log(a).to(self.dt_proj.weight.dtype))
        self.D = nn.Parameter(torch.ones(di, **fk))
        self.out_proj = nn.Linear(di, d_model, bias=bias, **fk)

    def _proj(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (batch, L, d_inner) after the conv → (Δ raw (batch, L, di), B, C (batch, L, N))."""
        r, n = self.dt_rank, self.d_state
        dbc = self.x_proj(x)
        dt, b, c = dbc.split((r, n, n), dim=-1)
        return F.linear(dt, self.dt_proj.weight), b, c

    def forward(self, u: Tensor) -> Tensor:
        """Parallel forward (bmojo_core's causal conv and selective scan)."""
        return self.forward_with(u, causal_conv1d_fn, selective_scan_fn)

    def forward_with(self, u: Tensor, conv: Any, scan: Any) -> Tensor:
        """The parallel forward on the given conv and scan (the signatures of
        :func:`~bmojo_core.causal_conv1d_fn` and :func:`~bmojo_core.selective_scan_fn`):
        :mod:`bmojo_core.distributed` passes its context-parallel ones."""
        xz = self.in_proj(u).transpose(1, 2)  # (batch, 2 di, L)
        x, z = xz.chunk(2, dim=1)
        x = conv(x, self.conv_weight, self.conv_bias, activation="silu")
        delta, b, c = self._proj(x.transpose(1, 2))
        y = scan(
            x, delta.transpose(1, 2), -torch.exp(self.A_log), b.transpose(1, 2),
            c.transpose(1, 2), self.D, z, delta_bias=self.dt_proj.bias, delta_softplus=True,
        )  # fmt: skip
        return self.out_proj(y.transpose(1, 2))

    # ------------------------------------------------------------------ streaming

    def state_pieces(self) -> list[Piece]:
        """The streaming state: the conv's last ``d_conv - 1`` inputs and the SSM state."""
        dt = self.conv_weight.dtype
        return [
            Piece("conv", (self.d_inner, max(self.d_conv - 1, 0)), dt),
            Piece("ssm", (self.d_inner, self.d_state), dt),
        ]

    def init_state(self, batch: int) -> dict[str, Tensor]:
        """A fresh streaming state of ``batch`` rows (:meth:`state_pieces`)."""
        return allocate(self.state_pieces(), batch, self.conv_weight.device)

    @torch.no_grad()
    def step(self, u: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Streaming: ``u (batch, T, d_model)``; updates ``state['conv']`` and
        ``state['ssm']`` in place; returns ``(batch, T, d_model)``."""
        di = self.d_inner
        xz = self.in_proj(u)
        # Detached parameters: the ops' decode fast paths take plain tensors only.
        x = causal_conv1d_update(
            xz[..., :di].transpose(1, 2).contiguous(), state["conv"], self.conv_weight.detach(),
            None if self.conv_bias is None else self.conv_bias.detach(), activation="silu",
        ).transpose(1, 2).contiguous()  # fmt: skip
        delta, b, c = self._proj(x)
        y = selective_state_update(
            state["ssm"], x, delta.contiguous(), -torch.exp(self.A_log.detach()), b.contiguous(),
            c.contiguous(), self.D.detach(), xz[..., di:].contiguous(),
            self.dt_proj.bias.detach(), True,
        )  # fmt: skip
        return self.out_proj(y)

    def native_params(self) -> dict[str, Any]:
        """Sizes and parameters for the fused native decode step (:mod:`bmojo_core.ops.decode`)."""
        return {
            "d_inner": self.d_inner,
            "d_state": self.d_state,
            "dt_rank": self.dt_rank,
            "d_conv": self.d_conv,
            "conv_w": self.conv_weight,
            "conv_b": self.conv_bias,
            "a": -torch.exp(self.A_log.detach()),  # as the Python step computes it
            "d": self.D,
            **linear("in_proj", self.in_proj),
            **linear("x_proj", self.x_proj),
            **linear("dt_proj", self.dt_proj),
            **linear("out_proj", self.out_proj),
        }
