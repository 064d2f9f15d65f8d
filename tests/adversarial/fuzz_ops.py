"""Hypothesis fuzzing of every public op's arguments (run by test_isolated.py in a child
process under a memory limit, so a crash or a runaway allocation fails one test instead of
taking the run down).

Each case starts from a valid call and breaks one argument one way: its rank, dtype,
strides (transposed, strided, expanded), a size, its values (NaN, ±inf, huge, negative,
zero), its type, or its memory (aliasing an argument the op writes in place). The property:
the call returns, or raises a ``BmojoError``; an in-place op that raised left every tensor
it writes bitwise unchanged.
"""

from __future__ import annotations

import bmojo_core as bm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

G = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G, dtype=torch.float64).to(dtype)


def pos(*shape):
    return torch.rand(*shape, generator=G, dtype=torch.float64).float() + 0.1


# Each factory returns (function, kwargs, what it writes in place: argument names, or a
# dict of the tensors an object owns).
def selective_scan():
    b, d, n, length = 2, 3, 4, 5
    return bm.selective_scan_fn, dict(
        u=rnd(b, d, length), delta=pos(b, d, length), A=-pos(d, n), B=rnd(b, n, length),
        C=rnd(b, n, length), D=rnd(d), z=rnd(b, d, length), delta_bias=rnd(d),
        delta_softplus=True, return_last_state=True, initial_state=rnd(b, d, n),
        seq_idx=torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.int32),
    ), ()  # fmt: skip


def state_update():
    b, d, n = 2, 3, 4
    return bm.selective_state_update, dict(
        state=rnd(b, d, n), x=rnd(b, d), dt=pos(b, d), A=-pos(d, n), B=rnd(b, n), C=rnd(b, n),
        D=rnd(d), z=rnd(b, d), dt_bias=rnd(d), dt_softplus=True,
    ), ("state",)  # fmt: skip


def state_update_pool():
    b, d, n = 2, 3, 4
    return bm.selective_state_update, dict(
        state=rnd(4, d, n), x=rnd(b, 2, d), dt=pos(b, 2, d), A=-pos(d, n), B=rnd(b, 2, n),
        C=rnd(b, 2, n), state_batch_indices=torch.tensor([3, 0]),
        intermediate_states=rnd(b, 2, d, n),
    ), ("state", "intermediate_states")  # fmt: skip


def conv_fn():
    b, d, length, k = 2, 3, 6, 4
    return bm.causal_conv1d_fn, dict(
        x=rnd(b, d, length), weight=rnd(d, k), bias=rnd(d),
        seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1], [0] * 6], dtype=torch.int32),
        activation="silu",
    ), ()  # fmt: skip


def conv_fn_states():
    b, d, length, k = 2, 3, 6, 4
    return bm.causal_conv1d_fn, dict(
        x=rnd(b, d, length), weight=rnd(d, k), initial_states=rnd(b, d, k - 1),
        return_final_states=True,
    ), ()  # fmt: skip


def conv_fn_out():
    b, d, length, k = 2, 3, 6, 4
    return bm.causal_conv1d_fn, dict(
        x=rnd(b, d, length), weight=rnd(d, k), return_final_states=True,
        final_states_out=rnd(b, d, k - 1),
    ), ()  # fmt: skip


def conv_update():
    b, d, k = 2, 3, 4
    return bm.causal_conv1d_update, dict(
        x=rnd(b, d), conv_state=rnd(b, d, k - 1), weight=rnd(d, k), bias=rnd(d),
        activation="silu",
    ), ("conv_state",)  # fmt: skip


def conv_update_pool():
    b, d, k = 2, 3, 4
    return bm.causal_conv1d_update, dict(
        x=rnd(b, d, 2), conv_state=rnd(3, d, k + 1), weight=rnd(d, k),
        cache_seqlens=torch.tensor([5, 1], dtype=torch.int32),
        conv_state_indices=torch.tensor([2, -1]),
    ), ("conv_state",)  # fmt: skip


def diag():
    return (
        bm.diag_scan,
        dict(a=pos(2, 3, 5), b=rnd(2, 3, 5), initial_state=rnd(2, 3), return_last_state=True),
        (),
    )


def companion():
    return bm.companion_scan, dict(
        u=rnd(2, 3, 5), alpha=rnd(3, 2) * 0.3, beta=rnd(3), c=rnd(3, 2), D=rnd(3),
        initial_state=rnd(2, 3, 2), return_final_state=True,
    ), ()  # fmt: skip


def bilinear():
    return bm.bilinear_scan, dict(
        u=rnd(2, 5, 2), A=rnd(3, 3) * 0.3, B=rnd(3, 2), C=rnd(2, 3), D=rnd(2, 2),
        N=rnd(2, 3, 3) * 0.1, initial_state=rnd(2, 3), return_final_state=True,
    ), ()  # fmt: skip


def innovation():
    return (
        bm.innovation_scores,
        dict(y=rnd(2, 6, 3), taps=2, metric="chi2", history=rnd(2, 2, 3), return_state=True),
        (),
    )


def select():
    return (
        bm.eidetic_select,
        dict(scores=pos(2, 7).double(), capacity=3, chunk=2, policy="topk", return_store=True),
        (),
    )


def gather():
    return (
        bm.gather_positions,
        dict(x=rnd(2, 6, 3), positions=torch.tensor([[0, 5, -1], [2, 2, 1]]), offset=0),
        (),
    )


def store_push():
    store = bm.EideticStore(2, 3, policy="threshold", threshold=0.1)
    store.push(pos(2, 4).double())
    owned = {"store.positions": store.positions, "store.scores": store.scores,
             "store.count": store.count}  # fmt: skip
    return store.push, dict(scores=pos(2, 3).double()), owned


CASES = [
    selective_scan, state_update, state_update_pool, conv_fn, conv_fn_states, conv_fn_out,
    conv_update,
    conv_update_pool, diag, companion, bilinear, innovation, select, gather, store_push,
]  # fmt: skip

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64,
          torch.int32, torch.uint8, torch.bool, torch.complex64]  # fmt: skip
VALUES = [float("nan"), float("inf"), float("-inf"), 3e38, -1.0, 0.0, 1e300]
ODD = [None, 1, 2.5, "x", [1, 2], (), True, 2**64, -(2**63)]


def mutate(data, kw: dict, writes) -> str:
    """Breaks one argument of ``kw`` in place; returns a description."""
    name = data.draw(st.sampled_from(sorted(kw)))
    v = kw[name]
    if not isinstance(v, torch.Tensor):
        kw[name] = data.draw(st.sampled_from(ODD))
        return f"{name} = {kw[name]!r}"
    kind = data.draw(
        st.sampled_from(
            [
                "rank+",
                "rank-",
                "dtype",
                "transpose",
                "strided",
                "expand",
                "size",
                "value",
                "type",
                "alias",
                "same",
            ]
        )  # fmt: skip
    )
    if kind == "rank+":
        kw[name] = v.unsqueeze(data.draw(st.integers(0, v.dim())))
    elif kind == "rank-" and v.dim():
        kw[name] = v.select(0, 0) if v.shape[0] else v.sum(0)
    elif kind == "dtype":
        kw[name] = v.to(data.draw(st.sampled_from(DTYPES)))
    elif kind == "transpose" and v.dim() >= 2:
        kw[name] = v.transpose(-1, -2)
    elif kind == "strided":
        big = torch.zeros(*v.shape[:-1], 2 * v.shape[-1] if v.dim() else 2, dtype=v.dtype)
        kw[name] = big[..., ::2] if v.dim() else big[0]
        kw[name].copy_(v)
    elif kind == "expand" and v.dim():
        kw[name] = v[:1].expand(v.shape) if v.shape[0] else v
    elif kind == "size" and v.dim():
        ax = data.draw(st.integers(0, v.dim() - 1))
        shape = list(v.shape)
        shape[ax] = data.draw(st.sampled_from([0, 1, max(0, shape[ax] - 1), shape[ax] + 1]))
        kw[name] = torch.zeros(shape, dtype=v.dtype)
    elif kind == "value":
        x = v.clone(memory_format=torch.contiguous_format)
        if x.is_floating_point() and x.numel():
            val = torch.tensor(data.draw(st.sampled_from(VALUES)), dtype=torch.float64)
            x.view(-1)[data.draw(st.integers(0, x.numel() - 1))] = val.to(x.dtype)
        elif x.numel() and x.dtype != torch.bool and not x.is_complex():
            info = torch.iinfo(x.dtype)
            x.view(-1)[0] = data.draw(st.sampled_from([info.min, -2, 2**31 - 1, info.max]))
        kw[name] = x
    elif kind == "type":
        kw[name] = data.draw(st.sampled_from([v.tolist(), v.numpy(), 1.0, None]))
    elif kind == "alias" and _written(kw, writes):
        live = _written(kw, writes)
        target = live[data.draw(st.sampled_from(sorted(live)))]
        flat = target.reshape(-1)
        if flat.numel() >= v.numel() and v.dtype == target.dtype and target.is_contiguous():
            kw[name] = flat[: v.numel()].view(v.shape)
    elif kind == "same":
        other = data.draw(st.sampled_from(sorted(kw)))
        if isinstance(kw[other], torch.Tensor):
            kw[name] = kw[other]
    return f"{name}: {kind}"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (NaN-safe bitwise comparison)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _written(kw: dict, writes) -> dict:
    if isinstance(writes, dict):
        return writes
    return {n: kw[n] for n in writes if isinstance(kw.get(n), torch.Tensor)}


@settings(max_examples=1500, deadline=None, database=None, derandomize=True)
@given(data=st.data(), case=st.sampled_from(CASES))
def test_public_op_arguments(data, case):
    fn, kw, writes = case()
    note = mutate(data, kw, writes)
    targets = _written(kw, writes)
    before = {n: t.clone() for n, t in targets.items()}
    try:
        fn(**kw)
    except bm.BmojoError:
        for n, t in targets.items():
            assert torch.equal(bits(t), bits(before[n])), (
                f"{case.__name__} ({note}): a failed call changed {n}"
            )
    except Exception as e:  # noqa: BLE001 - the property is "no other exception"
        raise AssertionError(f"{case.__name__} ({note}) raised {type(e).__name__}: {e}") from e


@settings(max_examples=500, deadline=None, database=None, derandomize=True)
@given(data=st.data(), case=st.sampled_from(CASES))
def test_public_op_arguments_twice_broken(data, case):
    """Two arguments broken at once (a check must not be skipped because another fired)."""
    fn, kw, writes = case()
    note = mutate(data, kw, writes) + "; " + mutate(data, kw, writes)
    try:
        fn(**kw)
    except bm.BmojoError:
        pass
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{case.__name__} ({note}) raised {type(e).__name__}: {e}") from e
