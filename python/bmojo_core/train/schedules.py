"""Learning-rate schedules: GreedyLR (raises the rate while the smoothed metric keeps
improving, lowers it when it stalls) and a linear-warmup cosine schedule."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from .._validate import int_arg, number_arg
from ..errors import BmojoTypeError, BmojoValueError

__all__ = ["GreedyLR", "cosine_schedule"]

# ----------------------------------------------------------------------------- GreedyLR


def _per_group(name: str, v: object, n: int) -> list[float]:
    vals = list(v) if isinstance(v, (list, tuple)) else [v] * n
    if len(vals) != n:
        raise BmojoValueError(f"{name}: expected one value per param group ({n}), got {len(vals)}")
    out = [number_arg(name, x) for x in vals]
    for x in out:
        if math.isnan(x) or x < 0:
            raise BmojoValueError(f"{name}: expected values >= 0, got {x}")
    return out


class GreedyLR(LRScheduler):
    """GreedyLR (Subramanian et al., Amazon): a loss-feedback scheduler that raises the
    learning rate while the monitored metric keeps improving and lowers it when it stops.

    Call ``step(metric)`` after each evaluation (e.g. with the validation loss). Each call:

    1. ``s`` = mean of the last ``smooth`` metrics (rolling average; ``smooth=1`` = raw).
    2. ``s`` is *good* when it beats the best smoothed value so far by more than
       ``threshold`` (``mode="min"``: ``s < best - threshold * |best|`` for
       ``threshold_mode="rel"``, ``s < best - threshold`` for ``"abs"``; mirrored for
       ``"max"``; the first evaluation always improves); then ``best = s``. Otherwise
       it is *bad* (no significant improvement: the metric stalled or worsened).
       Consecutive good (bad) evaluations are counted; a bad (good) one resets the
       other count.
    3. Direction keeping: while ``cooldown`` (``warmup``) evaluations remain after a
       decrease (increase), the good (bad) count is held at 0, so the rate cannot turn
       around; it may still move further in the same direction.
    4. More than ``patience`` consecutive bad evaluations: every group's rate becomes
       ``max(lr * factor, min_lr)``, the cooldown starts and the count resets. More than
       ``patience`` consecutive good ones: ``min(lr / factor, max_lr)``, the warmup starts.

    ``factor`` is in (0, 1). ``min_lr``/``max_lr`` are a number or one per param group;
    ``max_lr=None`` means 10x each group's initial rate. A NaN or infinite metric counts as
    the worst possible value (a diverging run is slowed down).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        mode: str = "min",
        factor: float = 0.9,
        patience: int = 2,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        smooth: int = 1,
        cooldown: int = 0,
        warmup: int = 0,
        min_lr: float | Sequence[float] = 0.0,
        max_lr: float | Sequence[float] | None = None,
        verbose: bool = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise BmojoTypeError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if mode not in ("min", "max"):
            raise BmojoValueError(f"mode: expected 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise BmojoValueError(
                f"threshold_mode: expected 'rel' or 'abs', got {threshold_mode!r}"
            )
        factor = number_arg("factor", factor)
        if not 0.0 < factor < 1.0:
            raise BmojoValueError(f"factor: expected a value in (0, 1), got {factor}")
        threshold = number_arg("threshold", threshold)
        if not (math.isfinite(threshold) and threshold >= 0):
            raise BmojoValueError(f"threshold: expected a finite value >= 0, got {threshold}")
        smooth = int_arg("smooth", smooth, 0)
        if smooth < 1:
            raise BmojoValueError(f"smooth: expected a window of >= 1 evaluations, got {smooth}")
        n = len(optimizer.param_groups)
        initial = [float(g["lr"]) for g in optimizer.param_groups]
        mins = _per_group("min_lr", min_lr, n)
        maxs = [10.0 * lr for lr in initial] if max_lr is None else _per_group("max_lr", max_lr, n)
        for lo, hi in zip(mins, maxs, strict=True):
            if hi < lo:
                raise BmojoValueError(f"max_lr: {hi} is below min_lr {lo}")

        self.optimizer = optimizer
        self.mode = mode
        self.factor = factor
        self.patience = int_arg("patience", patience, 0)
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.smooth = smooth
        self.cooldown = int_arg("cooldown", cooldown, 0)
        self.warmup = int_arg("warmup", warmup, 0)
        self.min_lrs = mins
        self.max_lrs = maxs
        self.verbose = bool(verbose)
        self.base_lrs = initial
        self.last_epoch = 0
        self._last_lr = list(initial)
        self.recent: list[float] = []
        self.best = math.inf if mode == "min" else -math.inf
        self.num_good = 0
        self.num_bad = 0
        self.cooldown_counter = 0
        self.warmup_counter = 0

    def _better(self, a: float, best: float) -> bool:
        if math.isinf(best):  # nothing seen yet: any finite value improves
            return a != best
        margin = self.threshold * abs(best) if self.threshold_mode == "rel" else self.threshold
        return a < best - margin if self.mode == "min" else a > best + margin

    def _set(self, up: bool) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            old = float(group["lr"])
            new = (
                min(old / self.factor, self.max_lrs[i])
                if up
                else max(old * self.factor, self.min_lrs[i])
            )
            group["lr"] = new
            if self.verbose and new != old:
                print(
                    f"GreedyLR: evaluation {self.last_epoch}: group {i} lr {old:.4g} -> {new:.4g}",
                    file=sys.stderr,
                )

    def step(self, metrics: float | Tensor | None = None, epoch: None = None) -> None:  # type: ignore[override]
        """Feed one evaluation's metric (a number or a 1-element tensor)."""
        if metrics is None:
            raise BmojoTypeError("metrics: GreedyLR.step needs the evaluation metric")
        if epoch is not None:
            raise BmojoValueError("epoch: not supported; call step(metric) once per evaluation")
        if isinstance(metrics, Tensor):
            if metrics.numel() != 1:
                raise BmojoValueError(
                    f"metrics: expected a scalar, got a tensor of shape {tuple(metrics.shape)}"
                )
            metrics = metrics.item()
        value = number_arg("metrics", metrics)
        worst = math.inf if self.mode == "min" else -math.inf
        if not math.isfinite(value):
            value = worst
        self.last_epoch += 1

        self.recent.append(value)
        del self.recent[: -self.smooth]
        current = math.fsum(self.recent) / len(self.recent) if worst not in self.recent else worst

        if self._better(current, self.best):
            self.best = current
            self.num_good += 1
            self.num_bad = 0
        else:
            self.num_bad += 1
            self.num_good = 0
        if self.cooldown_counter > 0:  # after a decrease: no increase yet
            self.cooldown_counter -= 1
            self.num_good = 0
        if self.warmup_counter > 0:  # after an increase: no decrease yet
            self.warmup_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            self._set(up=False)
            self.cooldown_counter, self.num_bad = self.cooldown, 0
        elif self.num_good > self.patience:
            self._set(up=True)
            self.warmup_counter, self.num_good = self.warmup, 0
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            k: (list(v) if isinstance(v, list) else v)
            for k, v in self.__dict__.items()
            if k != "optimizer"
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise BmojoTypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
        missing = {"best", "num_good", "num_bad", "recent"} - set(state_dict)
        if missing:
            raise BmojoValueError(f"state_dict: not a GreedyLR state (missing {sorted(missing)})")
        self.__dict__.update(
            {k: (list(v) if isinstance(v, list) else v) for k, v in state_dict.items()}
        )


# ----------------------------------------------------------------------------- cosine


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup then cosine decay, as a ``LambdaLR`` stepped once per optimizer step.

    The multiplier of the base rate at step ``s`` (0-based, the step about to be taken) is
    ``(s + 1) / warmup_steps`` for ``s < warmup_steps``, then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p = min(1, (s - warmup_steps) / (total_steps - warmup_steps))``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BmojoTypeError(
            f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    T = int_arg("total_steps", total_steps, 0)
    W = int_arg("warmup_steps", warmup_steps, 0)
    if T < 1:
        raise BmojoValueError(f"total_steps: expected >= 1, got {T}")
    if W >= T:
        raise BmojoValueError(f"warmup_steps: expected < total_steps ({T}), got {W}")
    r = number_arg("min_ratio", min_ratio)
    if not 0.0 <= r <= 1.0:
        raise BmojoValueError(f"min_ratio: expected a value in [0, 1], got {r}")

    def factor(s: int) -> float:
        if s < W:
            return (s + 1) / W
        p = min(1.0, (s - W) / (T - W))
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))

    return LambdaLR(optimizer, factor)
