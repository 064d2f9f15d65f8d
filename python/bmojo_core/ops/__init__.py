"""The ops layer: one module per op family, each a set of ``torch.library`` custom ops
(namespace ``bmojo``) with fake kernels, autograd and CPU and CUDA implementations
registered side by side, plus the public function that checks its arguments; the
pure-torch oracles of every family are in :mod:`.reference`.

* :mod:`.scan`: ``diag_scan``, ``selective_scan_fn`` (Mamba-1);
* :mod:`.inner`: ``mamba_inner_fn`` (Mamba-1's fused block, composed from the ops);
* :mod:`.ssd`: ``mamba_chunk_scan_combined`` (Mamba-2's SSD),
  ``mamba_split_conv1d_scan_combined`` (its fused block), ``ssd_state_update`` (its
  decoding step);
* :mod:`.step`: ``selective_state_update`` (decode step);
* :mod:`.conv`: ``causal_conv1d_fn``, ``causal_conv1d_update``;
* :mod:`.companion`: ``companion_scan``;
* :mod:`.bilinear`: ``bilinear_scan``;
* :mod:`.eidetic`: ``innovation_scores``, ``eidetic_select``, ``EideticStore``,
  ``gather_positions``;
* :mod:`.decode`: the fused native decode step of a whole language model.
"""

from . import reference
from .bilinear import bilinear_scan
from .companion import companion_scan
from .conv import causal_conv1d_fn, causal_conv1d_update
from .eidetic import EideticStore, eidetic_select, gather_positions, innovation_scores
from .inner import mamba_inner_fn
from .scan import diag_scan, selective_scan_fn
from .ssd import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined, ssd_state_update
from .step import selective_state_update

__all__ = [
    "EideticStore",
    "bilinear_scan",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "companion_scan",
    "diag_scan",
    "eidetic_select",
    "gather_positions",
    "innovation_scores",
    "mamba_chunk_scan_combined",
    "mamba_inner_fn",
    "mamba_split_conv1d_scan_combined",
    "reference",
    "selective_scan_fn",
    "selective_state_update",
    "ssd_state_update",
]
