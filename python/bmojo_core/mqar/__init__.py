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
    BUDGET_SCALES,
    MODELS,
    ExperimentConfig,
    ModelSpec,
    budget_specs,
    memory_floats,
    model_specs,
    run_experiment,
    sweep_specs,
)
from .report import (
    format_table,
    plot_accuracy,
    plot_budget,
    plot_sweep,
    save_results,
    summarize,
)

__all__ = [
    "BUDGET_SCALES",
    "IGNORE_INDEX",
    "MODELS",
    "ExperimentConfig",
    "MQARConfig",
    "ModelSpec",
    "budget_specs",
    "format_table",
    "make_batch",
    "make_mixed_batch",
    "make_test_set",
    "memory_floats",
    "model_specs",
    "plot_accuracy",
    "plot_budget",
    "plot_sweep",
    "query_positions",
    "run_experiment",
    "save_results",
    "summarize",
    "sweep_specs",
    "value_lags",
]
