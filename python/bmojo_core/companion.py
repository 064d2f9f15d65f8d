"""Companion (canonical-form) scan, SPEC §4. Placeholder until the kernel lands."""

from __future__ import annotations


def companion_scan(*args, **kwargs):
    raise NotImplementedError("companion_scan is being implemented")
