"""Context parallelism on torch.distributed: the ops of :mod:`bmojo_core` over a sequence
split along L in contiguous shards, one per rank of a process group (gloo or NCCL).
Imported only when used; ``import bmojo_core`` does not load it."""

from .conv import causal_conv1d_fn
from .layers import bmojo_layer, bmojo_lm, selective_ssm, sliding_window_attention
from .scan import selective_scan_fn
from .ssd import mamba_chunk_scan_combined

__all__ = [
    "bmojo_layer",
    "bmojo_lm",
    "causal_conv1d_fn",
    "mamba_chunk_scan_combined",
    "selective_scan_fn",
    "selective_ssm",
    "sliding_window_attention",
]
