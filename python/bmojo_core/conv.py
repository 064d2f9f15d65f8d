"""Causal depthwise convolution (nilpotent shift state), SPEC §3. Placeholder until the kernel lands."""

from __future__ import annotations


def causal_conv1d_fn(*args, **kwargs):
    raise NotImplementedError("causal_conv1d_fn is being implemented")


def causal_conv1d_update(*args, **kwargs):
    raise NotImplementedError("causal_conv1d_update is being implemented")
