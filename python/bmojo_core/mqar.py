"""Multi-query associative recall (MQAR), the Zoology benchmark's synthetic task.

Layout of one row (``N = num_kv``, ``L = seq_len``, ``V = vocab``)::

    position  0    1    2    3   ...  2N-2  2N-1 | 2N ... L-1
    input     k1   v1   k2   v2  ...  kN    vN   | query region
    label     -100 everywhere except at the query positions

* Keys ``k_i`` are drawn without replacement from ``[1, V/2)`` (distinct within a row);
  values ``v_i`` without replacement from ``[V/2, V)``. Token 0 is never a key or value.
* The query region ``[2N, L)`` has ``S = (L - 2N) // 2`` *slots* at its even offsets:
  slot ``s`` is position ``2N + 2s``. Each key is queried exactly once: key ``k_i`` sits
  at slot ``g_i``, the ``g_i`` drawn without replacement with probability proportional to
  ``(g + 1) ** (power_a - 1)`` (Zoology's power law: ``power_a = 1`` uniform, ``power_a < 1``
  concentrates the queries near the context block, ``power_a > 1`` far from it). The
  order of the queries is therefore random, not the context order.
* Next-token convention: ``labels[b, t]`` is the token the model must predict from
  ``inputs[b, :t+1]``. The label ``v_i`` sits **at the query position itself** (where
  ``inputs[b, t] == k_i``); the value is never written into the inputs after the query.
  Every other label is ``IGNORE_INDEX`` (-100, torch's cross-entropy default).
* Non-query positions of the query region hold 0 (``random_fill=False``) or tokens drawn
  uniformly from ``[0, V)`` (``random_fill=True``, as Zoology does; such a token may
  coincide with a key and act as a distractor, but it is never labelled). The fill is
  drawn last, so for the same seed both fills give the same keys, values and queries.

Everything is drawn with an explicit ``torch.Generator`` (never the global RNG), fully
vectorised over the batch, so a batch costs a few tensor ops per training step.

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

import json
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import BmojoTypeError, BmojoValueError

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
]

IGNORE_INDEX: int = -100


def _int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise BmojoTypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo:
        raise BmojoValueError(f"{name}: expected an int >= {lo}, got {v}")
    return int(v)


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR setting; validated on construction (see the module docstring for the layout).

    ``vocab`` must be even with room for ``num_kv`` distinct keys in ``[1, vocab/2)``
    (``vocab >= 2 * num_kv + 2``); ``seq_len`` must hold the context block and one
    even-offset slot per query (``seq_len >= 4 * num_kv``).
    """

    vocab: int = 512
    seq_len: int = 256
    num_kv: int = 8
    power_a: float = 1.0
    random_fill: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab", "seq_len", "num_kv"):  # numpy ints welcome, stored as int
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                object.__setattr__(self, name, int(v))
        V = _int("vocab", self.vocab, 4)
        L = _int("seq_len", self.seq_len, 4)
        N = _int("num_kv", self.num_kv, 1)
        if V % 2:
            raise BmojoValueError(f"vocab: expected an even size (keys below V/2), got {V}")
        if N > V // 2 - 1:
            raise BmojoValueError(
                f"num_kv: {N} distinct keys do not fit in [1, vocab/2) = [1, {V // 2}); "
                f"need vocab >= {2 * N + 2}"
            )
        if (L - 2 * N) // 2 < N:
            raise BmojoValueError(
                f"num_kv: {N} pairs need seq_len >= {4 * N} (context block of {2 * N} "
                f"tokens plus {N} query slots at even offsets), got seq_len {L}"
            )
        a = self.power_a
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            raise BmojoTypeError(f"power_a: expected a float, got {type(a).__name__}")
        if not (math.isfinite(a) and a > 0):
            raise BmojoValueError(f"power_a: expected a finite value > 0, got {a}")
        object.__setattr__(self, "power_a", float(a))
        if not isinstance(self.random_fill, bool):
            raise BmojoTypeError(
                f"random_fill: expected a bool, got {type(self.random_fill).__name__}"
            )

    @property
    def context_len(self) -> int:
        """Length of the key-value block at the start of every row (2 * num_kv)."""
        return 2 * self.num_kv

    @property
    def num_slots(self) -> int:
        """Even-offset positions of the query region where a query may sit."""
        return (self.seq_len - self.context_len) // 2

    def slot_probs(self) -> Tensor:
        """Probability of each slot for a single draw (float64, sums to 1)."""
        g = torch.arange(1, self.num_slots + 1, dtype=torch.float64)
        p = g ** (float(self.power_a) - 1.0)
        return p / p.sum()


def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    if generator is None:
        g = torch.Generator()
        g.seed()  # fresh entropy; the global RNG is left alone
        return g
    if isinstance(generator, bool):
        raise BmojoTypeError("generator: expected a torch.Generator, an int seed or None")
    if isinstance(generator, numbers.Integral):
        if generator < 0:
            raise BmojoValueError(f"generator: a seed must be >= 0, got {generator}")
        return torch.Generator().manual_seed(int(generator))
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise BmojoValueError(
                f"generator: expected a CPU generator, got device {generator.device}"
            )
        return generator
    raise BmojoTypeError(
        f"generator: expected a torch.Generator, an int seed or None, got "
        f"{type(generator).__name__}"
    )


def _draw_distinct(log_w: Tensor | None, rows: int, n: int, k: int, g: torch.Generator) -> Tensor:
    """(rows, k) distinct indices in [0, n) per row, drawn without replacement with weights
    exp(log_w) (uniform when None). Gumbel-top-k: the k largest of log_w + Gumbel noise
    are distributed as k sequential weighted draws without replacement, and topk is far
    cheaper than torch.multinomial row by row. float64 noise makes ties negligible."""
    u = torch.rand(rows, n, generator=g, dtype=torch.float64)
    if log_w is None:
        scores = u  # a monotone map of Gumbel noise: same ordering
    else:
        scores = log_w - torch.log(-torch.log(u.clamp_min(1e-300)))
    return scores.topk(k, dim=1, sorted=False).indices


def make_batch(
    config: MQARConfig,
    batch: int,
    generator: torch.Generator | int | None = None,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch of MQAR rows: ``(inputs, labels)``, both ``(batch, seq_len)`` int64.

    ``generator`` is a CPU ``torch.Generator`` (advanced by the call), an int seed, or None
    (fresh entropy). The data is generated on the CPU and moved to ``device`` if given.
    """
    if not isinstance(config, MQARConfig):
        raise BmojoTypeError(f"config: expected an MQARConfig, got {type(config).__name__}")
    B = _int("batch", batch, 1)
    g = _generator(generator)
    V, L, N = config.vocab, config.seq_len, config.num_kv
    half, ctx = V // 2, config.context_len

    keys = _draw_distinct(None, B, half - 1, N, g) + 1  # [1, V/2)
    values = _draw_distinct(None, B, V - half, N, g) + half  # [V/2, V)
    log_p = None if config.power_a == 1 else config.slot_probs().log()
    slots = _draw_distinct(log_p, B, config.num_slots, N, g)
    qpos = ctx + 2 * slots  # (B, N) query positions, key i queried at qpos[:, i]

    inputs = torch.zeros(B, L, dtype=torch.int64)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    if config.random_fill:
        inputs[:, ctx:] = torch.randint(0, V, (B, L - ctx), generator=g, dtype=torch.int64)
    inputs.scatter_(1, qpos, keys)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.int64)
    labels.scatter_(1, qpos, values)
    if device is not None:
        inputs, labels = inputs.to(device), labels.to(device)
    return inputs, labels


def make_test_set(config: MQARConfig, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed test set of ``n`` rows: the same for the same ``(config, n, seed)``,
    whatever the global RNG state."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise BmojoTypeError(f"seed: expected an int, got {type(seed).__name__}")
    return make_batch(config, n, seed)


def make_mixed_batch(
    configs: Sequence[MQARConfig],
    batch: int,
    generator: torch.Generator | int | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch mixing several settings (as Zoology trains on a mixture of ``num_kv``):
    ``batch`` rows split as evenly as possible over ``configs`` in order (the first
    ``batch % len(configs)`` settings get one row more), each block drawn by
    :func:`make_batch` from the same generator. All settings must share ``vocab`` and
    ``seq_len``; rows then differ in their number of labelled queries."""
    if isinstance(configs, MQARConfig) or not isinstance(configs, Sequence) or not configs:
        raise BmojoTypeError("configs: expected a non-empty sequence of MQARConfig")
    for c in configs:
        if not isinstance(c, MQARConfig):
            raise BmojoTypeError(f"configs: expected MQARConfig items, got {type(c).__name__}")
        if (c.vocab, c.seq_len) != (configs[0].vocab, configs[0].seq_len):
            raise BmojoValueError(
                "configs: every setting must have the same vocab and seq_len, got "
                f"{(configs[0].vocab, configs[0].seq_len)} and {(c.vocab, c.seq_len)}"
            )
    B = _int("batch", batch, len(configs))
    g = _generator(generator)
    q, r = divmod(B, len(configs))
    parts = [make_batch(c, q + (k < r), g) for k, c in enumerate(configs)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def query_positions(labels: Tensor) -> Tensor:
    """``(batch, num_queries)`` positions of the labelled queries, ascending per row
    (every row must have the same number of labels, as MQAR rows do)."""
    mask = labels != IGNORE_INDEX
    counts = mask.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise BmojoValueError("labels: rows have different numbers of labelled positions")
    n = int(counts[0]) if counts.numel() else 0
    pos = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return pos[mask].view(labels.shape[0], n)


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
        _int("window", window, 1),
        _int("n_fading", n_fading, 0),
        _int("n_eidetic", n_eidetic, 0),
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
    w, f = _int("window", window, 1), _int("n_fading", n_fading, 0)
    out = {}
    for e in n_eidetic:
        e = _int("eidetic_sweep", e, 0)
        label = f"B'MOJO-F (e=0, f={f})" if e == 0 else f"B'MOJO e={e}"
        out[f"e{e}"] = ModelSpec(f"e{e}", label, w, f, e)
    return out


SCHEDULES: tuple[str, ...] = ("cosine", "greedy")


def _ints(name: str, v: object, lo: int) -> tuple[int, ...]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (v,)
    if not isinstance(v, (tuple, list)):
        raise BmojoTypeError(f"{name}: expected a sequence of ints, got {v!r}")
    out = tuple(_int(name, n, lo) for n in v)
    if len(set(out)) != len(out):
        raise BmojoValueError(f"{name}: values must be distinct, got {list(out)}")
    return out


@dataclass(frozen=True)
class ExperimentConfig:
    """Settings of ``bmojo mqar`` (defaults: the default experiment, under 8 minutes on 2
    quiet cores; :meth:`quick`: the smoke version).

    Task: ``vocab``, ``seq_len``, ``num_kv`` (the values of N), ``power_a`` (1 = uniform
    query placement), ``random_fill`` (False = zero fill). Models (:func:`model_specs`):
    ``models``, ``d_model``, ``n_layers``, ``d_state``, ``n_heads``, ``window``,
    ``n_fading``, ``n_eidetic``; a non-empty ``eidetic_sweep`` replaces them by the
    variants of :func:`sweep_specs` (B'MOJO at ``window``/``n_fading`` with each
    ``n_eidetic`` of the sweep).

    Training (:func:`bmojo_core.train.train`, AdamW, fresh batches every step):
    ``mixture=True`` (default) trains each model once on batches that mix every N
    (:func:`make_mixed_batch`, ``batch_size`` rows split evenly over N, as Zoology does)
    and scores it at every N; ``mixture=False`` trains one model per (model, N). ``steps``,
    ``batch_size``, ``lr``, ``weight_decay`` (matrices only), ``schedule`` ("cosine" with
    ``warmup_frac`` of linear warm-up, or "greedy": GreedyLR driven by the training loss
    averaged over ``steps // 20`` steps, after the same warm-up). ``test_size`` rows in the
    fixed test set of each N; ``seed`` fixes data, initialisation and test sets.
    ``workers`` trainings at a time, each in its own process (1: in this process) on
    ``threads`` torch (and kernel) threads (None: leave as is). One thread per process is
    the default because these small tensors run far slower on 2 threads in one process
    than on 1 (measured on the 2-core machine: 26 ms vs 1 s per step of the quick SSM), and
    two one-thread runs use both cores.
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
    mixture: bool = True
    steps: int = 1400
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    test_size: int = 256
    seed: int = 0
    workers: int = 2
    threads: int | None = 1

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
        if not isinstance(self.mixture, bool):
            raise BmojoTypeError(f"mixture: expected a bool, got {type(self.mixture).__name__}")
        for n in self.num_kv:  # MQARConfig checks vocab, seq_len, power_a, random_fill and N
            self.task(n)
        for name, lo in (("d_model", 1), ("n_layers", 1), ("d_state", 1), ("n_heads", 1),
                         ("window", 1), ("n_fading", 0), ("n_eidetic", 0), ("steps", 1),
                         ("batch_size", 1), ("test_size", 1), ("seed", 0)):  # fmt: skip
            _int(name, getattr(self, name), lo)
        if self.mixture and self.batch_size < len(self.num_kv):
            raise BmojoValueError(
                f"batch_size: a mixed batch needs at least one row per N ({len(self.num_kv)}), "
                f"got {self.batch_size}"
            )
        if self.d_model % self.n_heads:
            raise BmojoValueError(
                f"n_heads: must divide d_model {self.d_model}, got {self.n_heads}"
            )
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, numbers.Real)
                or not (math.isfinite(v) and (v > 0 if name == "lr" else v >= 0))
            ):
                want = "> 0" if name == "lr" else ">= 0"
                raise BmojoValueError(f"{name}: expected a finite number {want}, got {v!r}")
        wf = self.warmup_frac
        if isinstance(wf, bool) or not isinstance(wf, numbers.Real) or not 0 <= wf < 1:
            raise BmojoValueError(f"warmup_frac: expected a number in [0, 1), got {wf!r}")
        if self.schedule not in SCHEDULES:
            raise BmojoValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        _int("workers", self.workers, 1)
        if self.threads is not None:
            _int("threads", self.threads, 1)

    @classmethod
    def quick(cls, **overrides: Any) -> ExperimentConfig:
        """The smoke version (``bmojo mqar --quick``): a shorter task (V = 128, L = 64,
        N in {2, 4}), window 16 + 4 fading + 8 eidetic, a short training; well under a
        minute on 2 cores, and the attention-bearing models still learn above chance."""
        kw: dict[str, Any] = dict(
            vocab=128, seq_len=64, num_kv=(2, 4), window=16, n_fading=4, n_eidetic=8,
            steps=200, batch_size=16, lr=3e-3, warmup_frac=0.1, test_size=128,
        )  # fmt: skip
        kw.update(overrides)
        return cls(**kw)

    def task(self, num_kv: int) -> MQARConfig:
        return MQARConfig(self.vocab, self.seq_len, num_kv, self.power_a, self.random_fill)

    def specs(self) -> dict[str, ModelSpec]:
        """The models run: the sweep variants if ``eidetic_sweep``, else ``models``."""
        if self.eidetic_sweep:
            return sweep_specs(self.window, self.n_fading, self.eidetic_sweep)
        allspecs = model_specs(self.window, self.n_fading, self.n_eidetic)
        return {m: allspecs[m] for m in self.models}

    def build(self, spec: ModelSpec):
        from .layers import BMojoLM

        return BMojoLM(
            self.vocab, self.d_model, self.n_layers, spec.window, spec.n_fading,
            spec.n_eidetic, d_state=self.d_state,
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
_TICK = 10  # steps per progress message


def _init_worker(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue


def _run_one(cfg: ExperimentConfig, name: str, n: int | None) -> list[dict[str, Any]]:
    """Trains one model (``n``: on that N alone; None: on the mixture of every N) and
    scores it at every N it was trained on; reports progress every ``_TICK`` steps to the
    queue of this process (if any). Runs on ``cfg.threads`` torch threads."""
    from . import get_num_threads, set_num_threads
    from .train import evaluate, train

    old_threads = torch.get_num_threads(), get_num_threads()
    if cfg.threads is not None:  # torch's and the kernels' pools
        torch.set_num_threads(cfg.threads)
        set_num_threads(cfg.threads)
    try:
        spec = cfg.specs()[name]
        nkv = cfg.num_kv if n is None else (n,)
        tasks = [cfg.task(k) for k in nkv]
        key = 0 if n is None else n
        with torch.random.fork_rng(devices=[]):  # init seeded, global RNG untouched
            torch.manual_seed(_seed(cfg, 2, key))
            model = cfg.build(spec)
        count = [0]

        def batch(g: torch.Generator) -> tuple[Tensor, Tensor]:
            # called once per step: the hook for progress
            count[0] += 1
            if _QUEUE is not None and count[0] % _TICK == 0:
                _QUEUE.put(_TICK)
            if len(tasks) == 1:
                return make_batch(tasks[0], cfg.batch_size, g)
            return make_mixed_batch(tasks, cfg.batch_size, g)

        greedy = cfg.schedule == "greedy"
        warmup = int(cfg.warmup_frac * cfg.steps)
        cpu0 = time.process_time()
        hist = train(
            model,
            batch,
            steps=cfg.steps,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            schedule=cfg.schedule,
            eval_every=max(1, cfg.steps // 20) if greedy else None,
            seed=_seed(cfg, 0, key),
            progress=False,
            warmup_steps=warmup,
            greedy_kwargs=_greedy_kwargs(cfg) if greedy else None,
        )
        if _QUEUE is not None and count[0] % _TICK:
            _QUEUE.put(count[0] % _TICK)
        cpu_s = time.process_time() - cpu0  # this process's CPU time: robust to load
        tail = hist["train_loss"][-max(1, cfg.steps // 10) :]
        out = []
        for task in tasks:
            test = make_test_set(task, cfg.test_size, _seed(cfg, 1, task.num_kv))
            loss, acc, ok = evaluate(model, *test, batch_size=64)
            out.append({
                "model": name,
                "num_kv": task.num_kv,
                "accuracy": acc,
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


def _greedy_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """GreedyLR for this task, fed every ``steps // 20`` steps with the mean training loss:
    up to 2x the base rate while the loss improves, down by 0.7 after more than two stalled
    evaluations (the MQAR loss sits on a plateau near log(V/2) before the recall circuit
    forms, so one or two stalled evaluations must not cut the rate), never below 1/30 of
    the base rate."""
    return {"factor": 0.7, "patience": 2, "smooth": 2, "cooldown": 1,
            "min_lr": cfg.lr / 30, "max_lr": cfg.lr * 2}  # fmt: skip


def run_experiment(
    cfg: ExperimentConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Trains and scores every model of ``cfg`` (default: the default experiment): one
    training per model on the mixture of N (``cfg.mixture``) or one per (model, N),
    ``cfg.workers`` trainings at a time in spawned processes (1: in this process), each on
    ``cfg.threads`` torch threads. Every training is seeded on its own, so the results do
    not depend on ``workers``. With ``workers > 1`` the trainings start in spawned
    processes: call it from a script under ``if __name__ == "__main__":``.

    Returns a JSON-ready dict: ``config``, ``models`` (the specs), ``chance`` (2 / V),
    ``runs`` (one per (model, N), N-major: ``model``, ``num_kv``, ``accuracy``,
    ``test_loss``, ``train_loss`` (mean over the last 10% of steps), ``params``, ``time_s``
    (wall time of the training, shared by every N of a mixture), ``cpu_s`` (CPU time of
    the training process over it: the wall time on an idle machine), and ``correct``: the per-query
    correctness, ``test_size`` rows of ``N`` 0/1 entries, the queries of a row in order of
    position), ``accuracy`` (model → {str(N): accuracy}), ``flip_rate`` ({str(N): share
    of the test queries that B'MOJO-F answers correctly and B'MOJO does not}, when both
    are run), ``sweep`` (with ``eidetic_sweep``: ``window``, ``n_fading`` and the
    ``n_eidetic`` values, in the order of the model keys) and ``time_s``. ``log``
    receives one line per scored (model, N).
    """
    from .train import negative_flip_rate

    cfg = ExperimentConfig() if cfg is None else cfg
    if not isinstance(cfg, ExperimentConfig):
        raise BmojoTypeError(f"cfg: expected an ExperimentConfig, got {type(cfg).__name__}")
    specs = cfg.specs()
    # costliest first, so that two workers finish close together (CPU time per step of the
    # default run: B'MOJO > B'MOJO-F > SSM > SWA; sweep variants by n_eidetic)
    cost = {"bmojo": 3, "bmojo-f": 2, "ssm": 1, "swa": 0}
    order = sorted(specs, key=lambda m: (-cost.get(m, 4), -specs[m].n_eidetic))
    if cfg.mixture:
        jobs: list[tuple[str, int | None]] = [(m, None) for m in order]
    else:
        jobs = [(m, n) for n in cfg.num_kv for m in order]
    done: dict[tuple[str, int], dict[str, Any]] = {}
    bar = _tqdm(len(jobs) * cfg.steps, progress, "mqar")
    t0 = time.perf_counter()

    def finish(runs: list[dict[str, Any]]) -> None:
        for run in runs:
            done[(run["model"], run["num_kv"])] = run
            if log is not None:
                label = specs[run["model"]].label
                log(
                    f"{label:<20} N={run['num_kv']:<3} accuracy {run['accuracy']:6.1%}  "
                    f"test loss {run['test_loss']:.3f}  ({run['time_s']:.1f} s)"
                )
        if bar is not None:
            bar.set_postfix_str(f"{len(done)}/{len(specs) * len(cfg.num_kv)} scored")

    try:
        if cfg.workers == 1:
            for name, n in jobs:
                if bar is not None:
                    bar.set_description(specs[name].label + ("" if n is None else f" N={n}"))
                steps0 = bar.n if bar is not None else 0
                finish(_run_one(cfg, name, n))
                if bar is not None:
                    bar.update(steps0 + cfg.steps - bar.n)
        else:
            _run_parallel(cfg, jobs, bar, finish)
    finally:
        if bar is not None:
            bar.close()
    runs = [done[(m, n)] for n in cfg.num_kv for m in specs]
    res: dict[str, Any] = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "models": {
            k: {**asdict(s), "attention_budget": s.attention_budget} for k, s in specs.items()
        },
        "chance": 2 / cfg.vocab,
        "runs": runs,
        "accuracy": {
            m: {str(r["num_kv"]): r["accuracy"] for r in runs if r["model"] == m} for m in specs
        },
        "time_s": time.perf_counter() - t0,
        "torch": torch.__version__,
    }
    if "bmojo-f" in specs and "bmojo" in specs:
        correct = {(r["model"], r["num_kv"]): torch.tensor(r["correct"], dtype=torch.bool)
                   for r in runs}  # fmt: skip
        res["flip_rate"] = {
            str(n): negative_flip_rate(correct[("bmojo-f", n)], correct[("bmojo", n)])
            for n in cfg.num_kv
        }
    if cfg.eidetic_sweep:
        res["sweep"] = {
            "window": cfg.window,
            "n_fading": cfg.n_fading,
            "n_eidetic": [specs[m].n_eidetic for m in specs],
        }
    return res


def _run_parallel(
    cfg: ExperimentConfig,
    jobs: list[tuple[str, int | None]],
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
        initargs=(q,),
    ) as pool:
        pending = {pool.submit(_run_one, cfg, name, n) for name, n in jobs}
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


def format_table(results: dict[str, Any]) -> str:
    """The accuracy table: rows = models (or sweep variants), columns = N (test accuracy
    in %), then the negative flip rate B'MOJO-F → B'MOJO (% of test queries) when both
    were run."""
    nkv = [str(n) for n in results["config"]["num_kv"]]
    rows = [[results["models"][m]["label"]] + [f"{100 * acc[n]:.1f}" for n in nkv]
            for m, acc in results["accuracy"].items()]  # fmt: skip
    if "flip_rate" in results:
        rows.append(["neg. flip F→B'MOJO"] + [f"{100 * results['flip_rate'][n]:.1f}" for n in nkv])
    head = ["accuracy (%)"] + [f"N={n}" for n in nkv]
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        cells = [c.rjust(w) for c, w in zip(r[1:], width[1:], strict=True)]
        return "  ".join([r[0].ljust(width[0]), *cells])

    out = [line(head), "  ".join("-" * w for w in width)]
    out += [line(r) for r in rows]
    out.append(f"chance = 1/(V/2) = {100 * results['chance']:.2f}%")
    return "\n".join(out)


def summarize(results: dict[str, Any]) -> str:
    """A few lines stating what the table shows: best model per N, B'MOJO vs B'MOJO-F;
    for the eidetic sweep, the best ``n_eidetic`` per N and where accuracy stops rising."""
    acc = results["accuracy"]
    labels = {m: results["models"][m]["label"] for m in acc}
    nkv = [str(n) for n in results["config"]["num_kv"]]
    lines = []
    if "sweep" in results:
        es = results["sweep"]["n_eidetic"]
        keys = list(acc)
        for n in nkv:
            a = [acc[k][n] for k in keys]
            best = max(range(len(a)), key=lambda i: a[i])
            # saturation: the smallest n_eidetic within 1 point (absolute) of the best
            sat = next(i for i in range(len(a)) if a[i] >= a[best] - 0.01)
            lines.append(
                f"N={n}: accuracy vs n_eidetic "
                + ", ".join(f"{e}: {100 * x:.1f}%" for e, x in zip(es, a, strict=True))
                + f"; best e={es[best]}, within 1 point of it from e={es[sat]}"
            )
        return "\n".join(lines)
    for n in nkv:
        best = max(acc, key=lambda m: acc[m][n])
        lines.append(f"N={n}: best {labels[best]} ({100 * acc[best][n]:.1f}%)")
    if "flip_rate" in results:
        d = [acc["bmojo"][n] - acc["bmojo-f"][n] for n in results["flip_rate"]]
        wins = sum(x > 0 for x in d)
        flips = ", ".join(f"{100 * v:.1f}%" for v in results["flip_rate"].values())
        lines.append(
            f"B'MOJO vs B'MOJO-F (eidetic tokens in place of fading ones): higher accuracy at "
            f"{wins} of {len(d)} values of N (mean difference {100 * sum(d) / len(d):+.1f} "
            f"points); negative flip rate per N: {flips}"
        )
    best_all = max(acc, key=lambda m: sum(acc[m].values()))
    lines.append(f"highest mean accuracy over N: {labels[best_all]}")
    return "\n".join(lines)


def _title(results: dict[str, Any]) -> str:
    c = results["config"]
    how = "mixture of N" if c["mixture"] else "one training per N"
    return f"MQAR, V={c['vocab']}, L={c['seq_len']}, {c['steps']} steps x {c['batch_size']}, {how}"


def plot_accuracy(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes a PNG of test accuracy vs N per model (matplotlib, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    nkv = results["config"]["num_kv"]
    for m, acc in results["accuracy"].items():
        ax.plot(nkv, [acc[str(n)] for n in nkv], marker="o", label=results["models"][m]["label"])
    ax.axhline(results["chance"], color="gray", ls=":", lw=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(nkv, [str(n) for n in nkv])
    ax.set_ylim(0, 1)
    ax.set_xlabel("N (key-value pairs)")
    ax.set_ylabel("test accuracy")
    c = results["config"]
    budget = c["window"] + c["n_fading"] + c["n_eidetic"]
    ax.set_title(f"{_title(results)}\nattention budget {budget}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


def plot_sweep(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes a PNG of test accuracy vs ``n_eidetic`` per N (the eidetic sweep)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sw = results["sweep"]
    es = sw["n_eidetic"]
    keys = list(results["accuracy"])
    for n in results["config"]["num_kv"]:
        ax.plot(es, [results["accuracy"][k][str(n)] for k in keys], marker="o", label=f"N={n}")
    ax.axhline(results["chance"], color="gray", ls=":", lw=1, label="chance")
    ax.set_xticks(es, [str(e) for e in es])
    ax.set_ylim(0, 1)
    ax.set_xlabel("n_eidetic (0 = B'MOJO-F)")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"{_title(results)}\nB'MOJO, window {sw['window']}, {sw['n_fading']} fading tokens",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


def save_results(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``results.json`` and ``accuracy.png`` (the sweep: ``eidetic_sweep.png``;
    skipped when matplotlib is missing) into ``out_dir`` (created). Returns the paths
    written."""
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {"json": os.path.join(out_dir, "results.json")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, separators=(",", ":"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return paths
    if "sweep" in results:
        paths["png"] = os.path.join(out_dir, "eidetic_sweep.png")
        plot_sweep(results, paths["png"])
    else:
        paths["png"] = os.path.join(out_dir, "accuracy.png")
        plot_accuracy(results, paths["png"])
    return paths
