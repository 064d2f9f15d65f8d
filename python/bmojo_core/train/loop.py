"""A model-agnostic trainer and evaluation helpers (accuracy on labelled positions,
per-query correctness, negative flip rate).

The model interface: a ``torch.nn.Module`` mapping token ids ``(B, L)`` int64 to logits
``(B, L, V)``. Labels are ``(B, L)`` int64 with ``-100`` at ignored positions (next-token
convention: ``labels[:, t]`` is the target of the logits at position ``t``). A model whose
``forward`` also takes ``label_mask`` (``(B, L)`` bool, e.g.
:class:`~bmojo_core.layers.BMojoLM`) is called with the labelled positions and returns their
logits only, ``(n, V)`` in row-major order: with a few labels per row (MQAR) the head and
the softmax then run on those rows alone.
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from .._validate import int_arg, number_arg
from ..errors import BmojoTypeError, BmojoValueError
from .schedules import GreedyLR, cosine_schedule

__all__ = ["IGNORE_INDEX", "evaluate", "negative_flip_rate", "train"]

IGNORE_INDEX: int = -100

# ----------------------------------------------------------------------------- evaluation


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_tokens(inputs: object, labels: object) -> tuple[Tensor, Tensor]:
    for name, t in (("inputs", inputs), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise BmojoTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32):
            raise BmojoTypeError(f"{name}: expected dtype int64, got {str(t.dtype)[6:]}")
        if t.dim() != 2:
            raise BmojoValueError(f"{name}: expected shape (B, L), got {tuple(t.shape)}")
    assert isinstance(inputs, Tensor) and isinstance(labels, Tensor)
    if inputs.shape != labels.shape:
        raise BmojoValueError(
            f"labels: expected the shape of inputs {tuple(inputs.shape)}, got {tuple(labels.shape)}"
        )
    return inputs.long(), labels.long()


def _takes_label_mask(model: torch.nn.Module) -> bool:
    try:
        return "label_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _logits(model: torch.nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits ``(n, V)`` and targets ``(n,)`` of the labelled positions, row-major. A model
    whose ``forward`` takes ``label_mask`` (e.g. :class:`~bmojo_core.layers.BMojoLM`)
    computes only those logits; otherwise the full ``(B, L, V)`` output is indexed (either
    way the softmax runs on labelled positions only)."""
    mask = labels != IGNORE_INDEX
    if _takes_label_mask(model):
        out = model(inputs, label_mask=mask)
        want = (int(mask.sum()),)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[:1] != want:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise BmojoValueError(
                f"model: expected logits of shape ({want[0]}, V) with label_mask, got {got}"
            )
    else:
        out = model(inputs)
        if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[:2] != inputs.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise BmojoValueError(
                f"model: expected logits of shape ({inputs.shape[0]}, {inputs.shape[1]}, V), "
                f"got {got}"
            )
        out = out[mask]
    lab = labels[mask]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= out.shape[-1]):
        raise BmojoValueError(
            f"labels: expected -100 or token ids in [0, {out.shape[-1]}) (the model's "
            f"vocabulary), got values in [{int(lab.min())}, {int(lab.max())}]"
        )
    return out, lab


def _loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``_logits``' output (labelled positions only)."""
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, inputs: Tensor, labels: Tensor, *, batch_size: int = 256
) -> tuple[float, float, Tensor]:
    """Mean cross-entropy and accuracy (argmax over the vocabulary) on the labelled
    positions, and the per-query correctness: a bool tensor with one entry per labelled
    position in row-major order (for MQAR rows: ``.view(B, num_kv)`` gives the queries
    of each row in order of position). The model is run in eval mode, ``batch_size`` rows
    at a time, and restored to its previous mode."""
    inputs, labels = _check_tokens(inputs, labels)
    bs = int_arg("batch_size", batch_size, 0)
    if bs < 1:
        raise BmojoValueError(f"batch_size: expected >= 1, got {bs}")
    n_lab = int((labels != IGNORE_INDEX).sum())
    if n_lab == 0:
        raise BmojoValueError("labels: no labelled position (all are -100)")
    dev = _model_device(model)
    was_training = model.training
    model.eval()
    total, correct = 0.0, []
    try:
        for i in range(0, inputs.shape[0], bs):
            x, y = inputs[i : i + bs].to(dev), labels[i : i + bs].to(dev)
            if not bool((y != IGNORE_INDEX).any()):
                continue
            logits, lab = _logits(model, x, y)
            total += float(_loss(logits, lab, "sum"))
            correct.append((logits.argmax(-1) == lab).cpu())
    finally:
        model.train(was_training)
    ok = torch.cat(correct)
    return total / n_lab, float(ok.float().mean()), ok


def negative_flip_rate(correct_a: Tensor, correct_b: Tensor) -> float:
    """Share of the test queries that model A answers correctly and model B does not
    (over all queries): ``mean(correct_a & ~correct_b)``. Inputs: per-query correctness
    of the same test set, bool (or 0/1 integer) tensors of equal shape."""
    out = []
    for name, t in (("correct_a", correct_a), ("correct_b", correct_b)):
        if not isinstance(t, Tensor):
            raise BmojoTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.bool:
            if t.is_floating_point() or t.is_complex() or bool(((t != 0) & (t != 1)).any()):
                raise BmojoTypeError(f"{name}: expected a bool (or 0/1) tensor, got {t.dtype}")
            t = t != 0
        out.append(t)
    a, b = out
    if a.shape != b.shape:
        raise BmojoValueError(
            f"correct_b: expected the shape of correct_a {tuple(a.shape)}, got {tuple(b.shape)}"
        )
    if a.numel() == 0:
        raise BmojoValueError("correct_a: empty (no queries)")
    return float((a & ~b).float().mean())


# ----------------------------------------------------------------------------- trainer

SCHEDULES = ("cosine", "greedy", "constant")


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the "bench" extra)
        return None
    return tqdm(total=total, dynamic_ncols=True, leave=False)


def train(
    model: torch.nn.Module,
    make_batch_fn: Callable[[torch.Generator], tuple[Tensor, Tensor]],
    *,
    steps: int,
    lr: float = 1e-3,
    schedule: str = "cosine",
    eval_every: int | None = None,
    eval_fn: Callable[[torch.nn.Module], Mapping[str, float]] | tuple[Tensor, Tensor] | None = None,
    weight_decay: float = 0.1,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
    greedy_kwargs: Mapping[str, Any] | None = None,
    betas: tuple[float, float] = (0.9, 0.98),
    lr_scale: Callable[[str], float] | None = None,
    micro_batches: int = 1,
    parallel: str | None = None,
    group: Any = None,
) -> dict[str, Any]:
    """Trains ``model`` in place with AdamW on a fresh batch per step.

    ``make_batch_fn(generator)`` returns ``(inputs, labels)`` (B, L) int64; it receives one
    CPU ``torch.Generator`` seeded with ``seed`` and advanced across steps, so a run's data
    stream is reproducible (model initialisation is the caller's business). Batches are
    moved to the model's device. Loss: cross-entropy on the labelled positions.

    ``schedule``: ``"cosine"`` (``cosine_schedule`` with ``warmup_steps``/``min_ratio``,
    stepped every step), ``"greedy"`` (``GreedyLR(**greedy_kwargs)`` stepped after every
    evaluation with its loss) or ``"constant"``. Weight decay applies to parameters of
    dimension >= 2 only (not to biases or norm gains). ``grad_clip``: max global grad norm
    (None: no clipping). ``lr_scale(name)``: a parameter's peak rate as a multiple of
    ``lr`` (by its name in ``model.named_parameters()``; None: 1 for all), e.g. a higher
    rate for the SSM than for the attention; the schedules scale every group alike, and
    a single ``min_lr``/``max_lr`` in ``greedy_kwargs`` is scaled per group too.

    Evaluation every ``eval_every`` steps and after the last one. ``eval_fn`` is either a
    ``(inputs, labels)`` test set (scored with ``evaluate``) or a callable ``model ->
    {"loss": ..., "accuracy": ..., ...}`` (called in eval mode under ``no_grad``); with
    none, the mean training loss since the previous evaluation is recorded (and drives
    GreedyLR).

    ``micro_batches``: the batch's rows split in this many contiguous parts (as
    ``torch.tensor_split``), each part's forward and backward run in turn, its loss summed
    over its labelled positions and divided by the batch's count of them (1: the whole
    batch at once; the same gradient either way, up to rounding; less memory).

    ``parallel`` (with ``torch.distributed`` initialised, e.g. under ``torchrun``; every
    rank of ``group`` (None: the default group) calls ``train`` alike, with identically
    initialised models; each draws the same batches):

    - ``"data"``: each rank runs one of ``world size`` row parts of every batch (``micro_batches``
      is ignored), and the ranks' gradients are summed in rank order on every rank (one
      all-gather per step), so that every rank takes the same step, and the run equals, bit
      for bit, a one-process run with ``micro_batches = world size`` on the same thread
      count.
    - ``"context"``: each rank runs every row's contiguous shard of the sequence (the
      split of ``torch.tensor_split`` along L) through :func:`bmojo_core.distributed.bmojo_lm`
      (``model`` must be a :class:`~bmojo_core.layers.BMojoLM`), and the gradients are
      summed as for ``"data"``; equal to a one-process run up to rounding.

    Evaluations run on every rank (the models are the same).

    Returns a history dict: ``train_loss`` and ``lr`` (one entry per step), ``eval_step``
    (1-based step counts), ``eval_loss``, ``eval_accuracy`` (NaN where unknown) and
    ``eval_<key>`` for other keys of an ``eval_fn`` result, and ``time_s`` (wall time).
    """
    if not isinstance(model, torch.nn.Module):
        raise BmojoTypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(make_batch_fn):
        raise BmojoTypeError("make_batch_fn: expected a callable generator -> (inputs, labels)")
    steps = int_arg("steps", steps, 0)
    if steps < 1:
        raise BmojoValueError(f"steps: expected >= 1, got {steps}")
    lr = number_arg("lr", lr)
    if not (math.isfinite(lr) and lr > 0):
        raise BmojoValueError(f"lr: expected a finite value > 0, got {lr}")
    if schedule not in SCHEDULES:
        raise BmojoValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    every = steps if eval_every is None else int_arg("eval_every", eval_every, 0)
    if every < 1:
        raise BmojoValueError(f"eval_every: expected >= 1, got {every}")
    if eval_fn is not None and not callable(eval_fn):
        if not (isinstance(eval_fn, (tuple, list)) and len(eval_fn) == 2):
            raise BmojoTypeError(
                "eval_fn: expected a callable model -> metrics, an (inputs, labels) pair or None"
            )
        _check_tokens(*eval_fn)
    weight_decay = number_arg("weight_decay", weight_decay)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise BmojoValueError(f"weight_decay: expected a finite value >= 0, got {weight_decay}")
    if grad_clip is not None:
        grad_clip = number_arg("grad_clip", grad_clip)
        if not grad_clip > 0:
            raise BmojoValueError(f"grad_clip: expected a value > 0 or None, got {grad_clip}")
    seed = int_arg("seed", seed, 0)
    micro_batches = int_arg("micro_batches", micro_batches, 1)
    forward_part, world = _parallel_setup(model, parallel, group)

    if lr_scale is not None and not callable(lr_scale):
        raise BmojoTypeError("lr_scale: expected a callable name -> float or None")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise BmojoValueError("model: has no trainable parameters")
    # One group per (decayed?, rate scale), in order of first appearance.
    by_key: dict[tuple[bool, float], list[Tensor]] = {}
    for name, p in named:
        k = 1.0 if lr_scale is None else number_arg(f"lr_scale({name!r})", lr_scale(name))
        if not (math.isfinite(k) and k > 0):
            raise BmojoValueError(f"lr_scale: expected a finite value > 0 for {name!r}, got {k}")
        by_key.setdefault((p.dim() >= 2, k), []).append(p)
    groups = [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * k}
        for (decay, k), ps in by_key.items()
    ]
    scales = [k for _, k in by_key]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas)
    sched: LRScheduler | None = None
    if schedule == "cosine":
        sched = cosine_schedule(opt, steps, warmup_steps, min_ratio)
    elif schedule == "greedy":
        gk = dict(greedy_kwargs or {})
        for key in ("min_lr", "max_lr"):
            if isinstance(gk.get(key), numbers.Real) and not isinstance(gk[key], bool):
                gk[key] = [gk[key] * k for k in scales]
        sched = GreedyLR(opt, **gk)

    def run_eval() -> dict[str, float]:
        if eval_fn is None:
            return {}
        if callable(eval_fn):
            model.eval()
            with torch.no_grad():
                res = dict(eval_fn(model))
            return {k: float(v) for k, v in res.items()}
        loss, acc, _ = evaluate(model, eval_fn[0], eval_fn[1])
        return {"loss": loss, "accuracy": acc}

    gen = torch.Generator().manual_seed(seed)
    dev = _model_device(model)
    hist: dict[str, Any] = {
        "train_loss": [],
        "lr": [],
        "eval_step": [],
        "eval_loss": [],
        "eval_accuracy": [],
    }
    bar = _progress_bar(steps, progress)
    t0 = time.perf_counter()
    since_eval: list[float] = []
    model.train()
    try:
        for step in range(steps):
            x, y = make_batch_fn(gen)
            x, y = _check_tokens(x, y)
            x, y = x.to(dev), y.to(dev)
            hist["lr"].append(float(opt.param_groups[0]["lr"]))
            opt.zero_grad(set_to_none=True)
            if forward_part is not None:
                lv = _parallel_backward(model, forward_part, x, y, params, group)
            elif micro_batches == 1:
                loss = _loss(*_logits(model, x, y))
                loss.backward()
                lv = float(loss.detach())
            else:
                lv = _parts_backward(model, x, y, micro_batches)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if isinstance(sched, LambdaLR):
                sched.step()
            hist["train_loss"].append(lv)
            since_eval.append(lv)
            if bar is not None:
                bar.update(1)
            if (step + 1) % every == 0 or step + 1 == steps:
                res = run_eval()
                model.train()
                if "loss" not in res:
                    res["loss"] = math.fsum(since_eval) / len(since_eval)
                since_eval = []
                hist["eval_step"].append(step + 1)
                known = {k[5:] for k in hist if k.startswith("eval_") and k != "eval_step"}
                for k in sorted(set(res) | known):
                    hist.setdefault(f"eval_{k}", [math.nan] * (len(hist["eval_step"]) - 1))
                    hist[f"eval_{k}"].append(res.get(k, math.nan))
                if isinstance(sched, GreedyLR):
                    sched.step(res["loss"])
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{res['loss']:.3f}",
                        acc=f"{res.get('accuracy', math.nan):.3f}",
                        lr=f"{opt.param_groups[0]['lr']:.2e}",
                    )
    finally:
        if bar is not None:
            bar.close()
    hist["time_s"] = time.perf_counter() - t0
    return hist


# ----------------------------------------------------------------------------- parts, ranks

PARALLEL = ("data", "context")


def _part_loss(logits: Tensor, labels: Tensor, n_total: int) -> Tensor:
    """A part's share of the batch's mean loss: its sum over the batch's labelled count."""
    return _loss(logits, labels, "sum") / n_total


def _labelled(labels: Tensor) -> int:
    n = int((labels != IGNORE_INDEX).sum())
    if n == 0:
        raise BmojoValueError("labels: no labelled position in the batch (all are -100)")
    return n


def _parts_backward(model: torch.nn.Module, x: Tensor, y: Tensor, k: int) -> float:
    """Backward over ``k`` row parts in turn (their gradients accumulate in order)."""
    n = _labelled(y)
    total = 0.0
    for xi, yi in zip(torch.tensor_split(x, k), torch.tensor_split(y, k), strict=True):
        loss = _part_loss(*_logits(model, xi, yi), n)
        loss.backward()
        total += float(loss.detach())
    return total


def _parallel_setup(model: torch.nn.Module, parallel: str | None, group: Any):
    """``(forward of this rank's part, world size)`` for ``parallel``; (None, 1) without."""
    if parallel is None:
        if group is not None:
            raise BmojoValueError("group: given without parallel ('data' or 'context')")
        return None, 1
    if parallel not in PARALLEL:
        raise BmojoValueError(f"parallel: expected one of {PARALLEL} or None, got {parallel!r}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise BmojoValueError(
            f"parallel={parallel!r}: torch.distributed is not initialised (run under torchrun, "
            "or call torch.distributed.init_process_group first)"
        )
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if parallel == "data":

        def data_part(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            xi = torch.tensor_split(x, world)[rank]
            yi = torch.tensor_split(y, world)[rank]
            return _logits(model, xi, yi)

        return data_part, world
    from ..distributed import bmojo_lm
    from ..layers import BMojoLM

    if not isinstance(model, BMojoLM):
        raise BmojoTypeError(
            f"model: parallel='context' trains a BMojoLM, got {type(model).__name__}"
        )

    def context_part(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        xi = torch.tensor_split(x, world, dim=1)[rank]
        yi = torch.tensor_split(y, world, dim=1)[rank]
        mask = yi != IGNORE_INDEX
        out = bmojo_lm(model, xi, label_mask=mask, group=group)
        return out, yi[mask]

    return context_part, world


def _parallel_backward(model: torch.nn.Module, part: Callable, x: Tensor, y: Tensor,
                       params: list[Tensor], group: Any) -> float:  # fmt: skip
    """This rank's part's backward, then every gradient summed over the ranks in rank
    order (an all-gather of the flattened gradients and of the part losses): the same
    sums, bit for bit, as accumulating the parts' gradients one after another."""
    import torch.distributed as dist

    n = _labelled(y)
    logits, lab = part(x, y)
    loss = _part_loss(logits, lab, n)
    loss.backward()
    world = dist.get_world_size(group)
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=dev)
    flat = torch.cat([has, loss.detach().to(torch.float64).reshape(1)]
                     + [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                        .to(torch.float64) for p in params])  # fmt: skip
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat, group=group)
    used = torch.stack([q[: len(params)] for q in parts]).amax(0) > 0
    total = 0.0
    for q in parts:
        total += float(q[len(params)])
    off = len(params) + 1
    for i, p in enumerate(params):
        k = p.numel()
        if not bool(used[i]):
            p.grad = None
            off += k
            continue
        g = None
        for q in parts:  # rank order; a rank without a gradient adds nothing
            if q[i] == 0:
                continue
            piece = q[off : off + k].view_as(p).to(p.dtype)
            g = piece.clone() if g is None else g.add_(piece)
        p.grad = g
        off += k
    return total
