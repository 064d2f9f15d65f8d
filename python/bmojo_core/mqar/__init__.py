"""Multi-query associative recall (MQAR): the task's generator (:mod:`.data`), the
experiment of ``bmojo mqar`` (:mod:`.experiment`) and its reports (:mod:`.report`)."""

from .data import (
    IGNORE_INDEX,
    MQARConfig,
    make_batch,
    make_mixed_batch,
    make_test_set,
    query_positions,
    value_lags,
)
from .experiment import (
    MODELS,
    ExperimentConfig,
    ModelSpec,
    model_specs,
    run_experiment,
    sweep_specs,
)
from .report import format_table, plot_accuracy, plot_sweep, save_results, summarize

__all__ = [
    "IGNORE_INDEX",
    "MODELS",
    "ExperimentConfig",
    "MQARConfig",
    "ModelSpec",
    "format_table",
    "make_batch",
    "make_mixed_batch",
    "make_test_set",
    "model_specs",
    "plot_accuracy",
    "plot_sweep",
    "query_positions",
    "run_experiment",
    "save_results",
    "summarize",
    "sweep_specs",
    "value_lags",
]
