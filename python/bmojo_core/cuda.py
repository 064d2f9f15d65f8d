"""CUDA runtime of bmojo_core (issue 5): NVRTC compilation of the kernel sources in
``cuda/`` (embedded in the extension), an on-disk CUBIN cache, a per-device module cache
and launches on torch's current stream. Placeholder: filled in by the CUDA work."""

from __future__ import annotations
