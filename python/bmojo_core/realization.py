"""Realization toolkit (SPEC §7). Placeholder: being written."""

from __future__ import annotations
