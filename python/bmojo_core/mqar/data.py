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
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import int_arg
from ..errors import BmojoTypeError, BmojoValueError
from ..train import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "MQARConfig",
    "make_batch",
    "make_mixed_batch",
    "make_test_set",
    "query_positions",
    "value_lags",
]


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
        V = int_arg("vocab", self.vocab, 4)
        L = int_arg("seq_len", self.seq_len, 4)
        N = int_arg("num_kv", self.num_kv, 1)
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
    B = int_arg("batch", batch, 1)
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
    B = int_arg("batch", batch, len(configs))
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


def value_lags(inputs: Tensor, labels: Tensor) -> Tensor:
    """``(batch, num_queries)`` int64: for every labelled query (in the order of
    :func:`query_positions`), how far back its answer sits, ``t - p`` with ``t`` the query
    position and ``p`` the position of the value token in the context block (the key
    ``inputs[b, t]`` is at ``p - 1``). A model whose attention covers ``[t - w + 1, t]``
    sees the answer of a query iff its lag is ``< w``. Every row must be an MQAR row with
    the same number of queries (a test set of one N)."""
    if not isinstance(inputs, Tensor) or not isinstance(labels, Tensor):
        raise BmojoTypeError("inputs, labels: expected tensors")
    if inputs.shape != labels.shape or inputs.dim() != 2:
        raise BmojoValueError(
            f"inputs, labels: expected two (batch, seq_len) tensors of one shape, got "
            f"{tuple(inputs.shape)} and {tuple(labels.shape)}"
        )
    qpos = query_positions(labels)  # (B, N)
    n = qpos.shape[1]
    if 2 * n > inputs.shape[1]:
        raise BmojoValueError(f"labels: {n} queries per row do not fit a context block")
    keys = inputs[:, 0 : 2 * n : 2]  # (B, N) context keys, pair j at positions 2j, 2j+1
    asked = inputs.gather(1, qpos)  # (B, N) the key each query asks for
    hit = asked.unsqueeze(2) == keys.unsqueeze(1)  # (B, query, pair)
    if not bool((hit.sum(2) == 1).all()):
        raise BmojoValueError("inputs: a query's key is not exactly one key of its context")
    pair = hit.to(torch.int64).argmax(2)
    return qpos - (2 * pair + 1)
