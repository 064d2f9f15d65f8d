"""The MQAR experiment of ``bmojo mqar``.

**The experiment** (``bmojo mqar``, :func:`run_experiment`): every model of
:func:`model_specs` (a :class:`~bmojo_core.layers.BMojoLM`) is trained once on fresh
batches that mix every number of pairs ``N`` (:func:`make_mixed_batch`, as Zoology trains
on a mixture of kv counts; :func:`bmojo_core.train.train`) and scored at every ``N`` on a
fixed seeded test set; the results hold the per-query correctness, the accuracy table and
the negative flip rate B'MOJO-F → B'MOJO per ``N`` (:func:`format_table`,
:func:`summarize`; :func:`save_results` writes ``results.json`` and ``accuracy.png``).
``--per-n`` trains one model per (model, N) instead. ``--eidetic-sweep 0,4,8,16,32``
trains B'MOJO at the default window and fading tokens with each number of eidetic tokens
(0 = B'MOJO-F with the same window and fading tokens; :func:`sweep_specs`) and reports
accuracy vs ``n_eidetic`` per ``N`` (table, summary, ``eidetic_sweep.png``).

Why one training per model on the mixture: the same recall circuit serves every ``N``, so
the four trainings of the default run (instead of sixteen, one per (model, N)) each get
four times the steps for the same time; with 350 steps per (model, N) every model but
B'MOJO stayed near chance.

Why short rows (``short_frac``, ``short_len``): at L = 256 most test queries lie beyond
every window (SWA's 56 tokens see about a fifth of them at N = 4, B'MOJO-F's 32 a tenth),
so on full-length rows most of the gradient asks a window model for what it cannot see.
Like Zoology and Based, the default mixes short rows (64 tokens, every N that fits) into
the stream, on 90 % of the steps at equal tokens per step: the layers have no positional
encoding, so what is learnt on short rows holds on long ones. Why two learning rates
(``model_lr``): the pure SSM stays near chance at 2e-3 in this budget and learns at 6e-3,
while B'MOJO-F learns at 2e-3 and loses half its accuracy at 6e-3 (SWA and B'MOJO are
indifferent), so the pure SSM trains at 6e-3 and the attention models at 2e-3 (as the
paper trains the SSM at Mamba's rates and attention at GPT-3's; raising only the SSM
parameters' rate inside B'MOJO-F, ``ssm_lr``, does not help it). The README's MQAR section
records each change's effect.

Conventions of the experiment:

* Equal attention budget ``w + f + e`` (default 32 + 8 + 16 = 56 tokens per query): B'MOJO
  attends to a window of ``w``, ``f`` fading (SSM output) tokens and ``e`` eidetic tokens;
  B'MOJO-F to the same window and ``f + e`` fading tokens; SWA to a window of ``w + f + e``.
  The pure SSM attends to nothing (same depth and width; its memory is its state).
* Seeds: the training stream and the initialisation depend on (seed, N) (N = 0 for the
  mixture) only, so every model of one training sees the same batches, and B'MOJO-F and
  B'MOJO (same parameter shapes) start from the same weights; the test set of each N
  depends on (seed, N) and differs from the training streams. Results do not depend on
  ``workers``.
* Accuracy: argmax over the whole vocabulary at each query position (chance 1/(V/2) for a
  model that has learnt that values lie in the upper half).
* Training runs on one torch and one kernel thread per worker process (two workers on the
  two cores); each run records its wall time and its CPU time (``cpu_s``, what the wall
  time would be on an idle machine).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .._validate import int_arg
from ..errors import BmojoTypeError, BmojoValueError
from ..layers import BMojoLM
from ..runtime import get_num_threads, set_num_threads
from ..train import evaluate, negative_flip_rate, train
from .data import MQARConfig, make_batch, make_mixed_batch, make_test_set, value_lags
from .stats import recall_ceiling, wilson_interval

__all__ = [
    "BUDGET_SCALES",
    "MODELS",
    "ExperimentConfig",
    "ModelSpec",
    "budget_specs",
    "memory_floats",
    "model_specs",
    "run_experiment",
    "sweep_specs",
]

# ----------------------------------------------------------------------------- experiment

MODELS: tuple[str, ...] = ("ssm", "swa", "bmojo-f", "bmojo")


@dataclass(frozen=True)
class ModelSpec:
    """One model of the experiment: a :class:`~bmojo_core.layers.BMojoLM` whose layers have
    this ``window`` / ``n_fading`` / ``n_eidetic`` (``window = 0``: pure SSM)."""

    name: str
    label: str
    window: int
    n_fading: int
    n_eidetic: int
    d_state: int | None = None  # None: the experiment's d_state
    base: str = ""  # the model of MODELS this is a variant of ("": name itself)

    @property
    def attention_budget(self) -> int:
        """Tokens each query attends to: window + fading + eidetic (0 for the pure SSM)."""
        return self.window + self.n_fading + self.n_eidetic


def model_specs(window: int = 32, n_fading: int = 8, n_eidetic: int = 16) -> dict[str, ModelSpec]:
    """The four models at an equal attention budget ``window + n_fading + n_eidetic``:

    * ``ssm``: pure SSM (Mamba mixer, no attention; its budget is its state instead);
    * ``swa``: sliding-window attention over ``window + n_fading + n_eidetic`` tokens;
    * ``bmojo-f``: B'MOJO-F, window ``window`` plus ``n_fading + n_eidetic`` fading tokens;
    * ``bmojo``: B'MOJO, window ``window``, ``n_fading`` fading and ``n_eidetic`` eidetic tokens.
    """
    w, f, e = (
        int_arg("window", window, 1),
        int_arg("n_fading", n_fading, 0),
        int_arg("n_eidetic", n_eidetic, 0),
    )
    return {
        "ssm": ModelSpec("ssm", "SSM", 0, 0, 0),
        "swa": ModelSpec("swa", f"SWA (w={w + f + e})", w + f + e, 0, 0),
        "bmojo-f": ModelSpec("bmojo-f", "B'MOJO-F", w, f + e, 0),
        "bmojo": ModelSpec("bmojo", "B'MOJO", w, f, e),
    }


def sweep_specs(window: int, n_fading: int, n_eidetic: Sequence[int]) -> dict[str, ModelSpec]:
    """The eidetic sweep: B'MOJO with a fixed ``window`` and ``n_fading`` and each value of
    ``n_eidetic`` (0 = B'MOJO-F with the same window and fading tokens). Keys ``e<n>``.
    The attention budget grows with ``n_eidetic`` (that is the point of the sweep)."""
    w, f = int_arg("window", window, 1), int_arg("n_fading", n_fading, 0)
    out = {}
    for e in n_eidetic:
        e = int_arg("eidetic_sweep", e, 0)
        label = f"B'MOJO-F (e=0, f={f})" if e == 0 else f"B'MOJO e={e}"
        out[f"e{e}"] = ModelSpec(f"e{e}", label, w, f, e)
    return out


BUDGET_SCALES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
"""Default memory-budget levels of ``--budget-sweep``: multiples of the default models'
memories (SSM d_state, window, fading and eidetic tokens all scaled alike)."""


def budget_specs(
    models: Sequence[str], scales: Sequence[float], window: int, n_fading: int, n_eidetic: int,
    d_state: int,
) -> dict[str, ModelSpec]:  # fmt: skip
    """The memory-budget sweep: every model of ``models`` at each scale ``k`` of its
    memory, keys ``<model>@<k>``: the SSM with ``d_state·k`` states; SWA with a window of
    ``(window + n_fading + n_eidetic)·k``; B'MOJO-F with ``window·k`` and
    ``(n_fading + n_eidetic)·k`` fading tokens; B'MOJO with ``window·k``,
    ``n_fading·k`` fading and ``n_eidetic·k`` eidetic tokens (rounded, windows and
    d_state at least 1). Budgets in floats: :func:`memory_floats`."""
    out = {}
    for m in models:
        for k in scales:

            def r(v: int, lo: int = 0, k: float = k) -> int:
                return max(lo, round(v * k))

            key = f"{m}@{k:g}"
            if m == "ssm":
                spec = ModelSpec(key, f"SSM (d_state={r(d_state, 1)})", 0, 0, 0, r(d_state, 1))
            elif m == "swa":
                w = r(window + n_fading + n_eidetic, 1)
                spec = ModelSpec(key, f"SWA (w={w})", w, 0, 0)
            elif m == "bmojo-f":
                w, f = r(window, 1), r(n_fading + n_eidetic)
                spec = ModelSpec(key, f"B'MOJO-F (w={w}, f={f})", w, f, 0)
            else:
                w, f, e = r(window, 1), r(n_fading), r(n_eidetic)
                spec = ModelSpec(key, f"B'MOJO (w={w}, f={f}, e={e})", w, f, e)
            out[key] = replace(spec, base=m)
    return out


def memory_floats(model: BMojoLM) -> int:
    """The memory a model carries from token to token, in floats, as the paper's x-axis
    counts it: per layer the SSM state and the causal conv's input buffer, plus the keys
    and values of every token its attention reads (window, fading and eidetic tokens);
    bookkeeping (positions, scores, innovation history) not counted."""
    names = {"ssm", "conv", "ring_k", "ring_v", "mem_k", "mem_v"}
    return sum(
        math.prod(p.shape) for layer in model.layer_state_pieces() for p in layer if p.name in names
    )


SCHEDULES: tuple[str, ...] = ("cosine", "greedy")


def _ints(name: str, v: object, lo: int) -> tuple[int, ...]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (v,)
    if not isinstance(v, (tuple, list)):
        raise BmojoTypeError(f"{name}: expected a sequence of ints, got {v!r}")
    out = tuple(int_arg(name, n, lo) for n in v)
    if len(set(out)) != len(out):
        raise BmojoValueError(f"{name}: values must be distinct, got {list(out)}")
    return out


def _scales(v: object) -> tuple[float, ...]:
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        v = (v,)
    if not isinstance(v, (tuple, list)):
        raise BmojoTypeError(f"budget_sweep: expected a sequence of numbers, got {v!r}")
    out = []
    for k in v:
        if (
            isinstance(k, bool)
            or not isinstance(k, numbers.Real)
            or not (math.isfinite(k) and k > 0)
        ):
            raise BmojoValueError(f"budget_sweep: expected finite scales > 0, got {k!r}")
        out.append(float(k))
    if len(set(out)) != len(out):
        raise BmojoValueError(f"budget_sweep: scales must be distinct, got {out}")
    return tuple(sorted(out))


def _model_rates(v: object) -> tuple[tuple[str, float], ...]:
    """``model_lr`` as (model, rate) pairs in the order of MODELS."""
    if isinstance(v, Mapping):
        v = tuple(v.items())
    if isinstance(v, str) or not isinstance(v, (tuple, list)):
        raise BmojoTypeError(f"model_lr: expected a mapping model -> rate, got {v!r}")
    out: dict[str, float] = {}
    for pair in v:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise BmojoTypeError(f"model_lr: expected (model, rate) pairs, got {pair!r}")
        m, r = pair
        if m not in MODELS:
            raise BmojoValueError(f"model_lr: unknown model {m!r}; expected some of {MODELS}")
        if m in out:
            raise BmojoValueError(f"model_lr: model {m!r} given twice")
        if (
            isinstance(r, bool)
            or not isinstance(r, numbers.Real)
            or not (math.isfinite(r) and r > 0)
        ):
            raise BmojoValueError(f"model_lr: expected a finite rate > 0 for {m!r}, got {r!r}")
        out[m] = float(r)
    return tuple((m, out[m]) for m in MODELS if m in out)


@dataclass(frozen=True)
class ExperimentConfig:
    """Settings of ``bmojo mqar`` (defaults: the default experiment, about 6 minutes on 2
    quiet cores; :meth:`quick`: the smoke version).

    Task: ``vocab``, ``seq_len``, ``num_kv`` (the values of N), ``power_a`` (1 = uniform
    query placement), ``random_fill`` (False = zero fill). Models (:func:`model_specs`):
    ``models``, ``d_model``, ``n_layers``, ``d_state``, ``n_heads``, ``window``,
    ``n_fading``, ``n_eidetic``; a non-empty ``eidetic_sweep`` replaces them by the
    variants of :func:`sweep_specs` (B'MOJO at ``window``/``n_fading`` with each
    ``n_eidetic`` of the sweep); a non-empty ``budget_sweep`` (scales, e.g.
    :data:`BUDGET_SCALES`) by every model of ``models`` at each scale of its memory
    (:func:`budget_specs`).

    Training (:func:`bmojo_core.train.train`, AdamW, fresh batches every step):
    ``mixture=True`` (default) trains each model once on batches that mix every N
    (:func:`make_mixed_batch`, ``batch_size`` rows split evenly over N, as Zoology does)
    and scores it at every N; ``mixture=False`` trains one model per (model, N).
    ``short_frac`` of the steps (drawn at random from the training stream; 0 = none) train
    on *short rows* instead: ``short_len`` tokens, the values of N that fit in them
    (``short_len >= 4 N``), as many rows as keep the tokens per step equal
    (``batch_size * seq_len // short_len``); see :meth:`short_tasks`. ``steps``,
    ``batch_size``, ``lr`` (peak rate), ``model_lr`` (peak rates of some models instead of
    ``lr``, by name in MODELS, e.g. ``{"ssm": 6e-3}``; :meth:`model_rate`), ``ssm_lr``
    (the SSM's parameters' peak rate in every model, None: the model's rate;
    :meth:`lr_scale`), ``weight_decay`` (matrices only), ``schedule`` ("cosine" with
    ``warmup_frac`` of linear warm-up, or "greedy": GreedyLR driven by the training loss
    averaged over ``steps // 20`` steps, after the same warm-up). ``test_size`` rows in the
    fixed test set of each N; ``seed`` fixes data, initialisation and test sets;
    ``seeds`` > 1 repeats every training with the seeds ``seed, seed + 1, ...`` (the table
    then shows the mean and the seed-to-seed spread).
    ``workers`` trainings at a time, each in its own process (1: in this process) on
    ``threads`` torch (and kernel) threads (None: leave as is). One thread per process is
    the default because these small tensors run far slower on 2 threads in one process
    than on 1 (measured on the 2-core machine: 26 ms vs 1 s per step of the quick SSM), and
    two one-thread runs use both cores.
    ``micro_batches``: each batch's gradient computed over this many row parts in turn
    (:func:`~bmojo_core.train.train`'s; the same up to rounding). ``nproc`` > 1: each
    training runs data-parallel on ``nproc`` spawned processes (gloo, one row part each;
    ``micro_batches`` is then ``nproc``), one training at a time (``workers`` is not
    used); its results equal, bit for bit, those of one process with ``micro_batches =
    nproc`` on the same thread count.
    """

    vocab: int = 512
    seq_len: int = 256
    num_kv: tuple[int, ...] = (4, 8, 16, 32)
    power_a: float = 1.0
    random_fill: bool = False
    models: tuple[str, ...] = MODELS
    d_model: int = 64
    n_layers: int = 2
    d_state: int = 16
    n_heads: int = 4
    window: int = 32
    n_fading: int = 8
    n_eidetic: int = 16
    eidetic_sweep: tuple[int, ...] = ()
    budget_sweep: tuple[float, ...] = ()
    mixture: bool = True
    short_frac: float = 0.9
    short_len: int = 64
    steps: int = 1400
    batch_size: int = 16
    lr: float = 2e-3
    model_lr: Mapping[str, float] | tuple[tuple[str, float], ...] = (("ssm", 6e-3),)
    ssm_lr: float | None = None
    weight_decay: float = 0.1
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    test_size: int = 256
    seed: int = 0
    seeds: int = 1
    workers: int = 2
    threads: int | None = 1
    micro_batches: int = 1
    nproc: int = 1

    def __post_init__(self) -> None:
        nkv = self.num_kv
        if (
            not isinstance(nkv, (tuple, list, numbers.Integral))
            or isinstance(nkv, bool)
            or (isinstance(nkv, (tuple, list)) and not nkv)
        ):
            raise BmojoTypeError(f"num_kv: expected a non-empty sequence of ints, got {nkv!r}")
        object.__setattr__(self, "num_kv", _ints("num_kv", nkv, 1))
        models = self.models
        if isinstance(models, str) or not isinstance(models, (tuple, list)) or not models:
            raise BmojoTypeError(f"models: expected a non-empty sequence of names, got {models!r}")
        for m in models:
            if m not in MODELS:
                raise BmojoValueError(f"models: unknown model {m!r}; expected some of {MODELS}")
        if len(set(models)) != len(models):
            raise BmojoValueError(f"models: names must be distinct, got {list(models)}")
        object.__setattr__(self, "models", tuple(m for m in MODELS if m in models))
        object.__setattr__(
            self, "eidetic_sweep", tuple(sorted(_ints("eidetic_sweep", self.eidetic_sweep, 0)))
        )
        object.__setattr__(self, "budget_sweep", _scales(self.budget_sweep))
        if self.budget_sweep and self.eidetic_sweep:
            raise BmojoValueError("budget_sweep: cannot be combined with eidetic_sweep")
        if not isinstance(self.mixture, bool):
            raise BmojoTypeError(f"mixture: expected a bool, got {type(self.mixture).__name__}")
        sf = self.short_frac
        if isinstance(sf, bool) or not isinstance(sf, numbers.Real) or not 0 <= sf < 1:
            raise BmojoValueError(f"short_frac: expected a number in [0, 1), got {sf!r}")
        if not 4 <= int_arg("short_len", self.short_len, 4) <= self.seq_len:
            raise BmojoValueError(
                f"short_len: expected 4 <= short_len <= seq_len {self.seq_len}, got "
                f"{self.short_len}"
            )
        for n in self.num_kv:  # MQARConfig checks vocab, seq_len, power_a, random_fill and N
            self.task(n)
        for name, lo in (("d_model", 1), ("n_layers", 1), ("d_state", 1), ("n_heads", 1),
                         ("window", 1), ("n_fading", 0), ("n_eidetic", 0), ("steps", 1),
                         ("batch_size", 1), ("test_size", 1), ("seed", 0),
                         ("seeds", 1)):  # fmt: skip
            int_arg(name, getattr(self, name), lo)
        if self.mixture and self.batch_size < len(self.num_kv):
            raise BmojoValueError(
                f"batch_size: a mixed batch needs at least one row per N ({len(self.num_kv)}), "
                f"got {self.batch_size}"
            )
        if self.d_model % self.n_heads:
            raise BmojoValueError(
                f"n_heads: must divide d_model {self.d_model}, got {self.n_heads}"
            )
        for name in ("lr", "weight_decay", "ssm_lr"):
            v = getattr(self, name)
            if name == "ssm_lr" and v is None:
                continue
            if (
                isinstance(v, bool)
                or not isinstance(v, numbers.Real)
                or not (math.isfinite(v) and (v > 0 if name == "lr" else v >= 0))
            ):
                want = "> 0" if name == "lr" else ">= 0"
                raise BmojoValueError(f"{name}: expected a finite number {want}, got {v!r}")
        object.__setattr__(self, "model_lr", _model_rates(self.model_lr))
        wf = self.warmup_frac
        if isinstance(wf, bool) or not isinstance(wf, numbers.Real) or not 0 <= wf < 1:
            raise BmojoValueError(f"warmup_frac: expected a number in [0, 1), got {wf!r}")
        if self.schedule not in SCHEDULES:
            raise BmojoValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        int_arg("workers", self.workers, 1)
        int_arg("micro_batches", self.micro_batches, 1)
        if int_arg("nproc", self.nproc, 1) > 1:
            if self.micro_batches not in (1, self.nproc):
                raise BmojoValueError(
                    f"micro_batches: with nproc={self.nproc} each process runs one row part, "
                    f"so it must be 1 or {self.nproc}, got {self.micro_batches}"
                )
            object.__setattr__(self, "micro_batches", self.nproc)
        if self.micro_batches > min(self.batch_size, self.batch_size * self.seq_len
                                    // self.short_len):  # fmt: skip
            raise BmojoValueError(
                f"micro_batches: expected at most the rows of a batch ({self.batch_size}), "
                f"got {self.micro_batches}"
            )
        if self.threads is not None:
            int_arg("threads", self.threads, 1)

    @classmethod
    def quick(cls, **overrides: Any) -> ExperimentConfig:
        """The smoke version (``bmojo mqar --quick``): a shorter task (V = 128, L = 64,
        N in {2, 4}), window 16 + 4 fading + 8 eidetic, a short training; well under a
        minute on 2 cores, and the attention-bearing models still learn above chance."""
        kw: dict[str, Any] = dict(
            vocab=128, seq_len=64, num_kv=(2, 4), window=16, n_fading=4, n_eidetic=8,
            steps=200, batch_size=16, lr=3e-3, model_lr=(), warmup_frac=0.1, test_size=128,
            short_len=32,
        )  # fmt: skip
        kw.update(overrides)
        return cls(**kw)

    def task(self, num_kv: int) -> MQARConfig:
        return MQARConfig(self.vocab, self.seq_len, num_kv, self.power_a, self.random_fill)

    def model_rate(self, name: str) -> float:
        """The peak rate of the model run under ``name`` (a key of :meth:`specs`; a budget
        variant ``"ssm@0.5"`` takes its model's rate): its ``model_lr`` entry, else ``lr``."""
        return dict(self.model_lr).get(name.split("@")[0], self.lr)

    def lr_scale(self, name: str, param: str) -> float:
        """The peak rate of parameter ``param`` (as named by ``named_parameters()``) of
        model ``name``, relative to the model's rate: ``ssm_lr / model_rate(name)`` for the
        SSM's (every parameter of a layer's :class:`~bmojo_core.layers.SelectiveSSM`) if
        ``ssm_lr`` is set, 1 for the rest (embedding, attention, MLPs, norms)."""
        if self.ssm_lr is not None and ".ssm." in param:
            return self.ssm_lr / self.model_rate(name)
        return 1.0

    def short_tasks(self, num_kv: Sequence[int]) -> tuple[list[MQARConfig], int]:
        """The short rows of a training on ``num_kv``: one setting per N that fits in
        ``short_len`` (none when ``short_frac`` is 0) and the rows per short step."""
        if not self.short_frac:
            return [], 0
        tasks = [
            MQARConfig(self.vocab, self.short_len, n, self.power_a, self.random_fill)
            for n in num_kv
            if 4 * n <= self.short_len
        ]
        rows = max(len(tasks), self.batch_size * self.seq_len // self.short_len)
        return tasks, rows

    def specs(self) -> dict[str, ModelSpec]:
        """The models run: the sweep variants if ``eidetic_sweep``, else ``models``."""
        if self.eidetic_sweep:
            return sweep_specs(self.window, self.n_fading, self.eidetic_sweep)
        if self.budget_sweep:
            return budget_specs(self.models, self.budget_sweep, self.window, self.n_fading,
                                self.n_eidetic, self.d_state)  # fmt: skip
        allspecs = model_specs(self.window, self.n_fading, self.n_eidetic)
        return {m: allspecs[m] for m in self.models}

    def build(self, spec: ModelSpec):
        return BMojoLM(
            self.vocab, self.d_model, self.n_layers, spec.window, spec.n_fading,
            spec.n_eidetic, d_state=spec.d_state or self.d_state,
            n_heads=self.n_heads if spec.window else None,
        )  # fmt: skip


def _seed(cfg: ExperimentConfig, kind: int, num_kv: int) -> int:
    """Distinct, reproducible seeds of kind 0 (training stream), 1 (test set), 2 (init):
    training streams and initialisations are shared by all models of one training (so
    B'MOJO-F and B'MOJO, whose parameters have the same shapes, start from the same weights
    and see the same batches: their flips compare like with like); ``num_kv`` 0 stands for
    the mixture; test sets differ from every training stream."""
    return ((cfg.seed * 7 + kind) * 1_000_003 + num_kv) * 101


def _tqdm(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, unit="step")


_QUEUE: Any = None  # a worker's progress queue (set by _init_worker)
_PARENT: int | None = None  # a worker's parent process (set by _init_worker)
_TICK = 10  # steps per progress message


def _init_worker(queue: Any, parent: int) -> None:
    global _QUEUE, _PARENT
    _QUEUE, _PARENT = queue, parent


def _orphaned() -> bool:
    """Whether this worker's parent has died (SIGKILL, or SIGTERM to it alone): the pool
    does not stop its workers then, and a training left alone would run to its end."""
    return _PARENT is not None and os.getppid() != _PARENT


def _run_one(cfg: ExperimentConfig, name: str, n: int | None,
             group: Any = None) -> list[dict[str, Any]]:  # fmt: skip
    """Trains one model (``n``: on that N alone; None: on the mixture of every N) and
    scores it at every N it was trained on; reports progress every ``_TICK`` steps to the
    queue of this process (if any). Runs on ``cfg.threads`` torch threads. With ``group``
    (every rank calls it alike), data-parallel over its ranks; the first rank scores, the
    others return ``[]``."""
    old_threads = torch.get_num_threads(), get_num_threads()
    if cfg.threads is not None:  # torch's and the kernels' pools
        torch.set_num_threads(cfg.threads)
        set_num_threads(cfg.threads)
    try:
        spec = cfg.specs()[name]
        nkv = cfg.num_kv if n is None else (n,)
        tasks = [cfg.task(k) for k in nkv]
        short, short_rows = cfg.short_tasks(nkv)
        key = 0 if n is None else n
        with torch.random.fork_rng(devices=[]):  # init seeded, global RNG untouched
            torch.manual_seed(_seed(cfg, 2, key))
            model = cfg.build(spec)
        count = [0]

        def batch(g: torch.Generator) -> tuple[Tensor, Tensor]:
            # called once per step: the hook for progress
            count[0] += 1
            if count[0] % _TICK == 0:
                if _orphaned():
                    os._exit(1)  # nobody is left to take the result
                if _QUEUE is not None:
                    _QUEUE.put(_TICK)
            if short and float(torch.rand((), generator=g, dtype=torch.float64)) < cfg.short_frac:
                return make_mixed_batch(short, short_rows, g)
            if len(tasks) == 1:
                return make_batch(tasks[0], cfg.batch_size, g)
            return make_mixed_batch(tasks, cfg.batch_size, g)

        greedy = cfg.schedule == "greedy"
        lr = cfg.model_rate(name)
        warmup = int(cfg.warmup_frac * cfg.steps)
        cpu0 = time.process_time()
        hist = train(
            model,
            batch,
            steps=cfg.steps,
            lr=lr,
            weight_decay=cfg.weight_decay,
            schedule=cfg.schedule,
            eval_every=max(1, cfg.steps // 20) if greedy else None,
            seed=_seed(cfg, 0, key),
            progress=False,
            warmup_steps=warmup,
            greedy_kwargs=_greedy_kwargs(lr) if greedy else None,
            lr_scale=functools.partial(cfg.lr_scale, name),
            micro_batches=cfg.micro_batches,
            parallel=None if group is None else "data",
            group=group,
        )
        if _QUEUE is not None and count[0] % _TICK:
            _QUEUE.put(count[0] % _TICK)
        cpu_s = time.process_time() - cpu0  # this process's CPU time: robust to load
        tail = hist["train_loss"][-max(1, cfg.steps // 10) :]
        out: list[dict[str, Any]] = []
        if group is not None:
            import torch.distributed as dist

            if dist.get_rank(group) != 0:
                return out
        for task in tasks:  # (the seed of the test set: _seed(cfg, 1, N))
            test = make_test_set(task, cfg.test_size, _seed(cfg, 1, task.num_kv))
            loss, acc, ok = evaluate(model, *test, batch_size=64)
            lo, hi = wilson_interval(int(ok.sum()), ok.numel())
            out.append({
                "model": name,
                "num_kv": task.num_kv,
                "seed": cfg.seed,
                "accuracy": acc,
                "ci95": [lo, hi],
                "ceiling": recall_ceiling(value_lags(*test), spec.window, spec.n_eidetic),
                "test_loss": loss,
                "train_loss": math.fsum(tail) / len(tail),
                "params": sum(p.numel() for p in model.parameters()),
                "time_s": hist["time_s"],
                "cpu_s": cpu_s,
                "correct": ok.view(cfg.test_size, task.num_kv).to(torch.int8).tolist(),
            })  # fmt: skip
        return out
    finally:
        torch.set_num_threads(old_threads[0])
        set_num_threads(old_threads[1])


def _greedy_kwargs(lr: float) -> dict[str, Any]:
    """GreedyLR for this task, fed every ``steps // 20`` steps with the mean training loss:
    up to 2x the base rate while the loss improves, down by 0.7 after more than two stalled
    evaluations (the MQAR loss sits on a plateau near log(V/2) before the recall circuit
    forms, so one or two stalled evaluations must not cut the rate), never below 1/30 of
    the base rate."""
    return {"factor": 0.7, "patience": 2, "smooth": 2, "cooldown": 1,
            "min_lr": lr / 30, "max_lr": lr * 2}  # fmt: skip


def run_experiment(
    cfg: ExperimentConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    record: str | os.PathLike | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Trains and scores every model of ``cfg`` (default: the default experiment): one
    training per model on the mixture of N (``cfg.mixture``) or one per (model, N), for
    each of ``cfg.seeds`` seeds, ``cfg.workers`` trainings at a time in spawned processes
    (1: in this process), each on ``cfg.threads`` torch threads. Every training is seeded
    on its own, so the results do not depend on ``workers``. With ``workers > 1`` the
    trainings start in spawned processes: call it from a script under
    ``if __name__ == "__main__":``.

    ``record``: a folder where every finished training is written at once
    (``<record>/trainings/<model>-<mix|nN>-seed<s>.json``, with the settings it ran
    under); with ``resume=True`` a training recorded there under the same settings (and
    torch version) is read back instead of run again, so an interrupted experiment picks
    up where it stopped and gives the same results.

    Returns a JSON-ready dict: ``config``, ``models`` (the specs), ``chance`` (2 / V),
    ``runs`` (one per (model, N, seed), N-major: ``model``, ``num_kv``, ``seed``,
    ``accuracy``, ``ci95`` (the accuracy's 95 % Wilson interval over the test queries),
    ``ceiling`` (the share of test queries whose answer the model's window and eidetic
    tokens can hold, :func:`~bmojo_core.mqar.stats.recall_ceiling`; None for the pure SSM),
    ``test_loss``, ``train_loss`` (mean over the last 10% of steps), ``params``, ``time_s``
    (wall time of the training, shared by every N of a mixture), ``cpu_s`` (CPU time of
    the training process over it: the wall time on an idle machine), and ``correct``: the
    per-query correctness, ``test_size`` rows of ``N`` 0/1 entries, the queries of a row
    in order of position), ``accuracy`` (model → {str(N): accuracy, the mean over seeds}),
    ``ci95`` and ``ceiling`` (model → {str(N): ...} over the pooled queries of every seed),
    ``spread`` (with several seeds: model → {str(N): [lowest, highest] accuracy over the
    seeds}), ``flip_rate`` ({str(N): share of the test queries that B'MOJO-F answers
    correctly and B'MOJO does not}, when both are run), ``sweep`` (with
    ``eidetic_sweep``: ``window``, ``n_fading`` and the ``n_eidetic`` values, in the order
    of the model keys), ``resumed`` (trainings read back from ``record``) and ``time_s``.
    ``log`` receives one line per scored (model, N, seed).
    """
    cfg = ExperimentConfig() if cfg is None else cfg
    if not isinstance(cfg, ExperimentConfig):
        raise BmojoTypeError(f"cfg: expected an ExperimentConfig, got {type(cfg).__name__}")
    specs = cfg.specs()
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    # costliest first, so that two workers finish close together (CPU time per step of the
    # default run: B'MOJO > B'MOJO-F > SSM > SWA; sweep variants by n_eidetic)
    cost = {"bmojo": 3, "bmojo-f": 2, "ssm": 1, "swa": 0}
    order = sorted(
        specs,
        key=lambda m: (-cost.get(specs[m].base or m, 4), -specs[m].window - specs[m].n_eidetic),
    )
    per_n: list[int | None] = [None] if cfg.mixture else list(cfg.num_kv)
    jobs: list[tuple[str, int | None, int]] = [
        (m, n, sd) for sd in seeds for n in per_n for m in order
    ]
    done: dict[tuple[str, int, int], dict[str, Any]] = {}
    bar = _tqdm(len(jobs) * cfg.steps, progress, "mqar")
    t0 = time.perf_counter()
    recorder = _Recorder(cfg, record) if record is not None else None
    resumed = 0

    def finish(runs: list[dict[str, Any]], *, fresh: bool = True) -> None:
        if fresh and recorder is not None:
            recorder.save(runs)
        for run in runs:
            done[(run["model"], run["num_kv"], run["seed"])] = run
            if log is not None:
                label = specs[run["model"]].label
                seed = f" seed {run['seed']}" if cfg.seeds > 1 else ""
                log(
                    f"{label:<20} N={run['num_kv']:<3}{seed} accuracy {run['accuracy']:6.1%}  "
                    f"test loss {run['test_loss']:.3f}  ({run['time_s']:.1f} s)"
                    + ("" if fresh else " [recorded]")
                )
        if bar is not None:
            total = len(specs) * len(cfg.num_kv) * len(seeds)
            bar.set_postfix_str(f"{len(done)}/{total} scored")

    todo = []
    for job in jobs:
        runs = recorder.load(*job) if (recorder is not None and resume) else None
        if runs is None:
            todo.append(job)
            continue
        resumed += 1
        finish(runs, fresh=False)
        if bar is not None:
            bar.update(cfg.steps)
    try:
        if cfg.nproc > 1:
            for name, n, sd in todo:
                if bar is not None:
                    bar.set_description(specs[name].label + ("" if n is None else f" N={n}"))
                finish(_run_data_parallel(_with_seed(cfg, sd), name, n, bar))
        elif cfg.workers == 1:
            for name, n, sd in todo:
                if bar is not None:
                    bar.set_description(specs[name].label + ("" if n is None else f" N={n}"))
                steps0 = bar.n if bar is not None else 0
                finish(_run_one(_with_seed(cfg, sd), name, n))
                if bar is not None:
                    bar.update(steps0 + cfg.steps - bar.n)
        elif todo:
            _run_parallel(cfg, todo, bar, finish)
    finally:
        if bar is not None:
            bar.close()
    runs = [done[(m, n, sd)] for n in cfg.num_kv for m in specs for sd in seeds]

    def pooled(m: str, n: int) -> Tensor:
        return torch.cat([torch.tensor(done[(m, n, sd)]["correct"], dtype=torch.bool)
                          for sd in seeds])  # fmt: skip

    res: dict[str, Any] = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "models": {
            k: {**asdict(s), "attention_budget": s.attention_budget} for k, s in specs.items()
        },
        "chance": 2 / cfg.vocab,
        "runs": runs,
        "accuracy": {
            m: {
                str(n): math.fsum(done[(m, n, sd)]["accuracy"] for sd in seeds) / len(seeds)
                for n in cfg.num_kv
            }
            for m in specs
        },  # fmt: skip
        "ci95": {
            m: {
                str(n): list(wilson_interval(int(pooled(m, n).sum()), pooled(m, n).numel()))
                for n in cfg.num_kv
            }
            for m in specs
        },  # fmt: skip
        "ceiling": {
            m: {
                str(n): _mean_or_none([done[(m, n, sd)]["ceiling"] for sd in seeds])
                for n in cfg.num_kv
            }
            for m in specs
        },  # fmt: skip
        "resumed": resumed,
        "time_s": time.perf_counter() - t0,
        "torch": torch.__version__,
    }
    if cfg.seeds > 1:
        res["spread"] = {
            m: {str(n): [min(done[(m, n, sd)]["accuracy"] for sd in seeds),
                         max(done[(m, n, sd)]["accuracy"] for sd in seeds)]
                for n in cfg.num_kv}
            for m in specs
        }  # fmt: skip
    if "bmojo-f" in specs and "bmojo" in specs:
        res["flip_rate"] = {
            str(n): negative_flip_rate(pooled("bmojo-f", n), pooled("bmojo", n)) for n in cfg.num_kv
        }
    if cfg.budget_sweep:
        res["budget"] = {
            k: {"model": sp.base, "scale": float(k.split("@")[1]),
                "floats": memory_floats(cfg.build(sp))}
            for k, sp in specs.items()
        }  # fmt: skip
    if cfg.eidetic_sweep:
        res["sweep"] = {
            "window": cfg.window,
            "n_fading": cfg.n_fading,
            "n_eidetic": [specs[m].n_eidetic for m in specs],
        }
    return res


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else math.fsum(values) / len(values)


def _with_seed(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The settings of one training of a multi-seed experiment."""
    return replace(cfg, seed=seed, seeds=1)


class _Recorder:
    """The trainings of an experiment on disk, one JSON file each, written atomically
    (a temporary file renamed into place) so an interrupted run leaves only whole files.
    A file holds the settings it ran under (everything that determines its results: the
    config but ``workers``, ``seeds`` and ``nproc``, the seed, the torch version) and is read back
    only under the same ones."""

    def __init__(self, cfg: ExperimentConfig, folder: str | os.PathLike) -> None:
        self.cfg = cfg
        self.folder = os.path.join(os.fspath(folder), "trainings")

    def _key(self, seed: int) -> dict[str, Any]:
        c = asdict(_with_seed(self.cfg, seed))
        for k in ("workers", "seeds", "nproc"):  # nproc: the same results as one process
            c.pop(k)
        return {"config": json.loads(json.dumps(c)), "torch": torch.__version__}

    def _path(self, name: str, n: int | None, seed: int) -> str:
        return os.path.join(
            self.folder, f"{name}-{'mix' if n is None else f'n{n}'}-seed{seed}.json"
        )

    def load(self, name: str, n: int | None, seed: int) -> list[dict[str, Any]] | None:
        try:
            with open(self._path(name, n, seed), encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or rec.get("key") != self._key(seed):
            return None
        runs = rec.get("runs")
        want = sorted(self.cfg.num_kv if n is None else (n,))
        if not isinstance(runs, list) or sorted(r.get("num_kv") for r in runs) != want:
            return None
        return runs

    def save(self, runs: list[dict[str, Any]]) -> None:
        name, seed = runs[0]["model"], runs[0]["seed"]
        n = None if self.cfg.mixture else runs[0]["num_kv"]
        os.makedirs(self.folder, exist_ok=True)
        path = self._path(name, n, seed)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": self._key(seed), "runs": runs}, f, separators=(",", ":"))
        os.replace(tmp, path)


def _run_parallel(
    cfg: ExperimentConfig,
    jobs: list[tuple[str, int | None, int]],
    bar: Any,
    finish: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Runs the jobs in ``cfg.workers`` spawned processes (spawn: no fork of a process whose
    OpenMP/kernel threads are live); progress comes back through a queue."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    q = ctx.Queue() if bar is not None else None
    with ProcessPoolExecutor(
        max_workers=min(cfg.workers, len(jobs)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(q, os.getpid()),
    ) as pool:
        pending = {pool.submit(_run_one, _with_seed(cfg, sd), name, n) for name, n, sd in jobs}
        try:
            while pending:
                ready, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                if q is not None:
                    while True:
                        try:
                            bar.update(q.get_nowait())
                        except queue_mod.Empty:
                            break
                for fut in ready:
                    finish(fut.result())
        except BaseException:
            for fut in pending:  # a failed run stops the experiment: drop the queued ones
                fut.cancel()
            raise


def _dp_rank(cfg: ExperimentConfig, name: str, n: int | None, rank: int, store: str,
             results: Any, progress: Any, parent: int) -> None:  # fmt: skip
    """One rank of a data-parallel training (a spawned process)."""
    import datetime
    import traceback

    import torch.distributed as dist

    _init_worker(progress if rank == 0 else None, parent)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=cfg.nproc,
                                timeout=datetime.timedelta(seconds=600))  # fmt: skip
        try:
            runs = _run_one(cfg, name, n, group=dist.group.WORLD)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            results.put(("ok", runs))
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def _run_data_parallel(cfg: ExperimentConfig, name: str, n: int | None,
                       bar: Any) -> list[dict[str, Any]]:  # fmt: skip
    """One training on ``cfg.nproc`` spawned processes (a gloo group over a file store);
    the first rank's scores. A rank that fails stops the others and raises here."""
    import multiprocessing as mp
    import queue as queue_mod
    import tempfile

    ctx = mp.get_context("spawn")
    results, progress = ctx.Queue(), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bmojo-dp-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_dp_rank, args=(cfg, name, n, r, store, results, progress,
                                                    os.getpid()), daemon=True)
                 for r in range(cfg.nproc)]  # fmt: skip
        for p in procs:
            p.start()
        try:
            while True:
                while True:
                    try:
                        ticks = progress.get_nowait()
                    except queue_mod.Empty:
                        break
                    if bar is not None:
                        bar.update(ticks)
                try:
                    kind, payload = results.get(timeout=0.25)
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(
                            f"mqar: data-parallel rank {dead[0]} of {name} exited with code "
                            f"{procs[dead[0]].exitcode}"
                        ) from None
                    continue
                if kind == "error":
                    raise RuntimeError(f"mqar: data-parallel training of {name} failed on "
                                       f"{payload}")  # fmt: skip
                for p in procs:
                    p.join()
                return payload
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
