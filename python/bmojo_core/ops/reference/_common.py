"""Helpers shared by the reference implementations: the thresholded softplus of the
CUDA peers and the compute dtype rule (float64 as soon as any input is float64, else
float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cast", "compute_dtype", "softplus_thresholded"]

_SOFTPLUS_THRESHOLD = 20.0


def softplus_thresholded(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) = log(1 + exp(x))``, replaced by the identity where ``x > 20``.

    This is the convention of the CUDA peers (mamba_ssm); the gradient is exact on both
    branches (``sigmoid(x)`` below the threshold, ``1`` above it).
    """
    return torch.where(x > _SOFTPLUS_THRESHOLD, x, F.softplus(x))


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given floating tensor is float64, else float32."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
