"""The public names: everything importable from ``bmojo_core`` and from the documented
submodules, pinned. Adding a name means adding it here; removing or renaming one fails
(users import these)."""

from __future__ import annotations

import importlib

import bmojo_core as bm
import pytest

PUBLIC = {
    "bmojo_core": {
        "BMojoConfig", "BMojoLM", "BMojoLayer", "BmojoCompileError", "BmojoCudaError",
        "BmojoError", "BmojoTypeError", "BmojoValueError", "EideticStore", "SelectiveSSM",
        "SlidingWindowAttention", "Stream", "__version__", "bilinear_scan", "causal_conv1d_fn",
        "causal_conv1d_update", "companion_scan", "cuda", "diag_scan", "eidetic_select",
        "gather_positions", "get_num_threads", "innovation_scores", "layers",
        "mamba_chunk_scan_combined", "mamba_inner_fn", "mamba_split_conv1d_scan_combined",
        "realization",
        "reference", "selective_scan_fn",
        "selective_state_update", "set_num_threads", "set_simd_level", "simd_level",
        "simd_levels", "ssd_state_update", "stream",
    },
    "bmojo_core.errors": {
        "BmojoCompileError", "BmojoCudaError", "BmojoError", "BmojoTypeError", "BmojoValueError",
    },
    "bmojo_core.runtime": {
        "cuda", "get_num_threads", "set_num_threads", "set_simd_level", "simd_level",
        "simd_levels",
    },
    "bmojo_core.runtime.cuda": {
        "ARCHS", "DTYPES", "Kernel", "OPTIONS", "cache_dir", "compile_source", "declare",
        "declared", "info", "nvrtc_available", "prepare", "sources",
    },
    "bmojo_core.ops": {
        "EideticStore", "bilinear_scan", "causal_conv1d_fn", "causal_conv1d_update",
        "companion_scan", "diag_scan", "eidetic_select", "gather_positions", "innovation_scores",
        "mamba_chunk_scan_combined", "mamba_inner_fn", "mamba_split_conv1d_scan_combined",
        "reference", "selective_scan_fn", "selective_state_update", "ssd_state_update",
    },
    "bmojo_core.ops.reference": {
        "bilinear_scan", "causal_conv1d", "causal_conv1d_update", "companion_scan", "diag_scan",
        "eidetic_held_ref", "eidetic_select_ref", "innovation_scores_ref", "selective_scan",
        "selective_state_update", "softplus_thresholded", "ssd_scan",
    },
    "bmojo_core.inference": {"Piece", "Stream", "StreamingLM"},
    "bmojo_core.inference.stream": {"FORMAT_VERSION", "MAGIC", "Stream", "StreamingLM"},
    "bmojo_core.layers": {
        "BMojoConfig", "BMojoLM", "BMojoLayer", "SelectiveSSM", "SlidingWindowAttention",
    },
    "bmojo_core.layers.reference": {"bmojo_layer_ref", "selective_ssm_ref"},
    "bmojo_core.realization": {
        "Bilinear", "Companion", "Diagonal", "LTI", "MAX_COND", "MAX_DENSE_ORDER",
        "MIN_POLE_SEPARATION", "RANK_TOL", "Shift",
    },
    "bmojo_core.integrations.transformers": {
        "MAMBA1_MODELS", "MAMBA2_MODELS", "Report", "disable", "enable", "status",
        "use_bmojo_core",
    },
    "bmojo_core.testing": {
        "assert_equivalent", "assert_same_markov", "bilinear_realizations", "chunkings",
        "companion_realizations", "diagonal_realizations", "input_sequences",
        "lti_realizations", "shift_realizations",
    },
    "bmojo_core.train": {
        "GreedyLR", "IGNORE_INDEX", "cosine_schedule", "evaluate", "negative_flip_rate", "train",
    },
    "bmojo_core.mqar": {
        "BUDGET_SCALES", "budget_specs", "memory_floats", "plot_budget",
        "ExperimentConfig", "IGNORE_INDEX", "MODELS", "MQARConfig", "ModelSpec", "format_table",
        "make_batch", "make_mixed_batch", "make_test_set", "model_specs", "plot_accuracy",
        "plot_sweep", "query_positions", "run_experiment", "save_results", "summarize",
        "sweep_specs", "value_lags",
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_are_pinned(name):
    mod = importlib.import_module(name)
    assert set(mod.__all__) == PUBLIC[name], (
        f"{name}.__all__ changed: added {sorted(set(mod.__all__) - PUBLIC[name])}, "
        f"removed {sorted(PUBLIC[name] - set(mod.__all__))}"
    )
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"


def test_top_level_modules_are_the_documented_ones():
    """The module attributes of ``bmojo_core`` are the homes the docs name."""
    assert bm.layers is importlib.import_module("bmojo_core.layers")
    assert bm.stream is importlib.import_module("bmojo_core.inference.stream")
    assert bm.reference is importlib.import_module("bmojo_core.ops.reference")
    assert bm.cuda is importlib.import_module("bmojo_core.runtime.cuda")
    assert bm.realization is importlib.import_module("bmojo_core.realization")
    assert bm.Stream is bm.stream.Stream and bm.BMojoLM is bm.layers.BMojoLM
