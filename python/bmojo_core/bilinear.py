"""Bilinear and time-varying dense scans, SPEC §5. Placeholder until the kernel lands."""

from __future__ import annotations


def bilinear_scan(*args, **kwargs):
    raise NotImplementedError("bilinear_scan is being implemented")
