"""Fused streaming decode step (bmojo_core.ops.decode, chosen by bmojo_core.inference.decode):
one-token feeds through the native step equal the Python step path (``BMojoLayer.step``) and
the parallel forward, for
every layer variant, metric and policy, fp32 and fp64, batch 1 and slots at different
positions; bitwise identical eidetic positions; bitwise independent of the thread count
at every SIMD level; save/load mid-stream; parameters changed in place; bad inputs leave
the stream unchanged."""

from __future__ import annotations

import bmojo_core
import pytest
import torch
from bmojo_core.inference import Stream
from bmojo_core.inference import decode as D
from bmojo_core.layers import BMojoLM
from conftest import assert_close

# (window, n_fading, n_eidetic, extra kwargs)
VARIANTS = {
    "bmojo": (4, 2, 3, {}),
    "bmojo-f": (4, 3, 0, {}),
    "ssm": (0, 0, 0, {}),
    "swa": (4, 0, 0, {}),
    "eidetic-only": (4, 0, 3, {}),
    "chi2": (4, 2, 3, {"innovation_metric": "chi2"}),
    "threshold": (4, 2, 3, {"eidetic_policy": "threshold", "eidetic_threshold": 0.05}),
    "fifo": (3, 5, 4, {"eidetic_policy": "fifo", "eidetic_threshold": 0.02}),
}
# Integer/bool state pieces: the fused path must reproduce them exactly. The eidetic ones
# (store/mem positions, mem_mask) are selections on innovation scores that the two paths
# round differently (about 1e-16 relative in fp64, 1e-6 in fp32); with these seeds no
# selection changes under score perturbations up to 1e-4 of the largest score (checked), so
# they cannot flip on another CPU.
EXACT = ("position", "has_logits", "innov_count", "store_positions", "store_count",
         "mem_positions", "mem_mask")  # fmt: skip


def make_lm(variant="bmojo", dtype=torch.float64, seed=0, d=16, layers=2, vocab=40):
    w, mf, me, kw = VARIANTS[variant]
    torch.manual_seed(seed)
    return BMojoLM(vocab, d, layers, w, mf, me, d_state=4, n_heads=2, dtype=dtype, **kw)


def toks(b, length, vocab=40, seed=0):
    return torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(seed))


def pair(model, b):
    fused, ref = model.stream(b), model.stream(b)
    fused.fused_decode, ref.fused_decode = True, False
    return fused, ref


def assert_states(a: Stream, b: Stream, dtype, msg=""):
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        x, y = a.state[k], b.state[k]
        if k.rsplit(".", 1)[-1] in EXACT:
            assert torch.equal(x, y), f"{msg} {k}: {x} != {y}"
        else:
            assert_close(x, y, dtype, f"{msg} {k}")


def assert_fused_used(stream):
    assert stream._plan is not None and stream._plan.fused is not None


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_equals_python_step_and_parallel(variant, dtype):
    model = make_lm(variant, dtype)
    length = 23  # several chunk boundaries; the stores fill up
    tok = toks(2, length)
    full = model(tok)
    fused, ref = pair(model, 2)
    for t in range(length):
        a, b = fused.feed(tok[:, t]), ref.feed(tok[:, t])
        assert_close(a, b, dtype, f"step {t} vs python path")
        assert_close(a, full[:, t], dtype, f"step {t} vs parallel")
        assert_states(fused, ref, dtype, f"step {t}")
    assert_fused_used(fused)
    assert ref._plan is None


def test_batch_one_and_slots_at_different_positions():
    model = make_lm("bmojo", torch.float64, d=16)
    fused, ref = pair(model, 3)
    tok = toks(3, 30, seed=1)
    for s in (fused, ref):
        s.feed(tok[:, :5])  # multi-token path first
    for t in range(5, 30):
        if t == 11:
            for s in (fused, ref):
                s.reset(1)  # slot 1 restarts: its positions differ from the others
        if t == 17:
            for s in (fused, ref):
                s.reset([0, 2])
        assert_close(fused.feed(tok[:, t]), ref.feed(tok[:, t]), torch.float64, f"t={t}")
        assert_states(fused, ref, torch.float64, f"t={t}")
    # The reset slot equals a fresh stream of the tokens it saw since.
    one = model.stream(1)
    out = one.feed(tok[1:2, 11:30])
    assert_close(fused.state["logits"][1], out[0, -1], torch.float64, "slot 1")
    # Batch 1.
    f1, r1 = pair(model, 1)
    for t in range(15):
        assert_close(f1.feed(tok[:1, t]), r1.feed(tok[:1, t]), torch.float64, f"b1 t={t}")
    assert_states(f1, r1, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_every_level_and_thread_count(dtype, restore_runtime):
    # d=64 is enough work for the native step to use the whole team.
    model = make_lm("bmojo", dtype, d=64, vocab=50)
    tok = toks(2, 14, vocab=50, seed=2)
    ref = model.stream(2)
    ref.fused_decode = False
    want = torch.stack([ref.feed(tok[:, t]) for t in range(tok.shape[1])], 1)
    for level in bmojo_core.simd_levels():
        bmojo_core.set_simd_level(level)
        runs = []
        for nt in (1, 2):
            bmojo_core.set_num_threads(nt)
            s = model.stream(2)
            out = torch.stack([s.feed(tok[:, t]) for t in range(tok.shape[1])], 1)
            assert_close(out, want, dtype, f"{level} threads={nt}")
            assert_states(s, ref, dtype, f"{level} threads={nt}")
            runs.append((out, s.state))
        # Bitwise: the same fused step at the same level (thread-count invariant blocks).
        assert torch.equal(runs[0][0], runs[1][0]), f"{level}: logits differ across threads"
        for k in runs[0][1]:
            assert torch.equal(runs[0][1][k], runs[1][1][k]), f"{level}: {k} differs"


def test_generate_matches_python_path():
    model = make_lm("bmojo", torch.float64)
    fused, ref = pair(model, 2)
    prompt = toks(2, 6, seed=3)
    fused.feed(prompt)
    ref.feed(prompt)
    # The two paths are different computations: their logits agree to rounding, not
    # bitwise, so equal tokens need choices that no near-tie decides. Greedy, one token at a
    # time: the logits agree and the top two are far apart (the paths differ by ~1e-16), so
    # the argmax cannot flip.
    for i in range(12):
        want = ref.state["logits"]
        assert_close(fused.state["logits"], want, torch.float64, f"greedy step {i}")
        top2 = want.topk(2, dim=-1).values
        assert bool((top2[:, 0] - top2[:, 1] > 1e-9).all()), f"near-tie at step {i}"
        assert torch.equal(fused.generate(1, temperature=0.0), ref.generate(1, temperature=0.0))
    # Sampling with one generator over 8 steps: with these seeds every draw is decided by a
    # relative margin >= 3% (argmax of p / Exp(1) noise) and the top-k cut by a logit gap
    # >= 2e-3, both far above the paths' ~1e-16 difference.
    a = fused.generate(8, temperature=0.8, top_k=5, seed=4)
    b = ref.generate(8, temperature=0.8, top_k=5, seed=4)
    assert torch.equal(a, b)
    assert_states(fused, ref, torch.float64)


def test_save_load_mid_stream_then_continue():
    model = make_lm("fifo", torch.float64)
    tok = toks(2, 20, seed=5)
    whole = model.stream(2)
    outs = [whole.feed(tok[:, t]) for t in range(20)]
    s = model.stream(2)
    for t in range(9):
        s.feed(tok[:, t])
    s2 = Stream.load(model, s.save())
    # Bitwise: the state is restored verbatim and every stream runs the same fused step.
    for t in range(9, 20):
        assert torch.equal(s2.feed(tok[:, t]), outs[t]), f"t={t}"
        s.feed(tok[:, t])
    for k in whole.state:
        assert torch.equal(s2.state[k], whole.state[k]), k
        assert torch.equal(s.state[k], whole.state[k]), k
    # Replacing the state dict (load into an existing stream's slot) rebinds the views.
    s.state = Stream.load(model, s2.save()).state
    assert torch.equal(s.feed(tok[:, 0]), s2.feed(tok[:, 0]))


def test_parameters_changed_in_place_or_replaced():
    model = make_lm("bmojo", torch.float64)
    fused, ref = pair(model, 1)
    tok = toks(1, 12, seed=6)
    for t in range(5):
        fused.feed(tok[:, t])
        ref.feed(tok[:, t])
    with torch.no_grad():
        model.blocks[0].mlp[0].weight.mul_(1.5)  # in place: bumps _version
        model.blocks[1].mixer.ssm.A_log.add_(0.1)
    for t in range(5, 8):
        assert_close(fused.feed(tok[:, t]), ref.feed(tok[:, t]), torch.float64, f"t={t}")
    model.load_state_dict({k: v * 0.9 for k, v in model.state_dict().items()})
    for t in range(8, 12):
        assert_close(fused.feed(tok[:, t]), ref.feed(tok[:, t]), torch.float64, f"t={t}")
    model.blocks[1].mlp[2].weight.data = model.blocks[1].mlp[2].weight.data * 2  # replaced
    assert_close(fused.feed(tok[:, 0]), ref.feed(tok[:, 0]), torch.float64, "replaced")


def test_other_dtypes_fall_back_and_escape_hatch(monkeypatch):
    model = make_lm("bmojo", torch.float64).to(torch.bfloat16)
    s = model.stream(1)
    s.feed(toks(1, 3)[:, 0])  # bf16: Python path, state in torch tensors
    assert s._native is None and s._plan is None
    model = make_lm("bmojo", torch.float64)
    monkeypatch.setenv(D.ENV, "0")
    s = model.stream(1)
    s.feed(toks(1, 3)[:, 0])
    assert s._plan is None
    monkeypatch.setenv(D.ENV, "1")
    s.feed(toks(1, 3)[:, 1])
    assert_fused_used(s)
    # The attribute wins over the environment.
    monkeypatch.setenv(D.ENV, "0")
    forced = model.stream(1)
    forced.fused_decode = True
    forced.feed(toks(1, 1)[:, 0])
    assert_fused_used(forced)


def test_bad_inputs_leave_stream_unchanged():
    model = make_lm("bmojo", torch.float64)
    s = model.stream(2)
    s.feed(toks(2, 7))
    before = {k: v.clone() for k, v in s.state.items()}
    with pytest.raises(bmojo_core.BmojoValueError, match="vocabulary"):
        s.feed(torch.tensor([1, 40]))
    with pytest.raises(bmojo_core.BmojoValueError):
        s.feed(torch.tensor([1, 2, 3]))
    # A corrupted store is caught natively before anything is written.
    s.state["layers.1.store_positions"][0, 0] = 99
    bad = {k: v.clone() for k, v in s.state.items()}
    with pytest.raises(ValueError, match="eidetic store"):
        s.feed(torch.tensor([1, 2]))
    for k in bad:
        assert torch.equal(s.state[k], bad[k]), k
    s.state["layers.1.store_positions"].copy_(before["layers.1.store_positions"])
    for k in before:
        assert torch.equal(s.state[k], before[k]), k
    # The native entry point checks its arguments too.
    fused = s._plan.fused
    with pytest.raises(ValueError, match="vocabulary"):
        fused.step(torch.tensor([1, 99]), s._native)
    with pytest.raises(ValueError, match="expected"):
        fused.step(torch.tensor([1]), s._native)
    with pytest.raises(TypeError):
        fused.step(torch.tensor([1.0, 2.0]), s._native)
    for k in before:
        assert torch.equal(s.state[k], before[k]), k


def test_native_state_is_declared_by_name():
    """The stream's state lives in native buffers built from its declaration: the tensors
    view them (a write through a tensor is what the kernel reads), and a wrong declaration
    is refused by name."""
    from bmojo_core import _core
    from bmojo_core.ops.decode import NativeState

    model = make_lm("bmojo", torch.float64)
    s = model.stream(2)
    assert s._native is not None
    native = s._native._native
    for i, st in enumerate(s._native.layer_tensors):  # every piece views its native buffer
        for name, t in st.items():
            assert s.state[f"layers.{i}.{name}"] is t
            assert t.data_ptr() == native.array(i, name).ctypes.data, name
    s.feed(toks(2, 5))
    want = s.state["logits"].clone()
    s.state["logits"].zero_()
    assert torch.equal(s._native.stream_tensors["logits"], torch.zeros_like(want))
    DS = _core.decode.DecodeState
    with pytest.raises(bmojo_core.BmojoValueError, match='unknown piece "ring"'):
        DS([], [[("ring", "float64", (2, 3))]])
    with pytest.raises(bmojo_core.BmojoValueError, match="declared twice"):
        DS([("position", "int64", (2,)), ("position", "int64", (2,))], [])
    with pytest.raises(bmojo_core.BmojoTypeError, match="conv: expected dtype"):
        DS([], [[("conv", "float16", (2, 3))]])
    with pytest.raises(bmojo_core.BmojoValueError, match='no piece "ssm"'):
        DS([], [[("conv", "float64", (2, 3))]]).array(0, "ssm")
    with pytest.raises(bmojo_core.BmojoValueError, match="layer: expected < 1"):
        DS([], [[]]).array(1, "conv")
    # A state of another float dtype than the plan is refused before anything is written.
    f32 = make_lm("bmojo", torch.float32)
    other = NativeState(
        [p for p in s.pieces[:3]],  # float64 logits
        f32.layer_state_pieces(),
        2,
    )
    fused = bmojo_core.inference.decode.DecodePlan(f32).fused
    before = {k: v.clone() for k, v in other.stream_tensors.items()}
    with pytest.raises(bmojo_core.BmojoTypeError, match="logits: expected a float32 buffer"):
        fused.step(torch.tensor([1, 2]), other)
    for k, v in before.items():
        assert torch.equal(other.stream_tensors[k], v), k


def test_native_buffers_outlive_the_stream():
    """A tensor taken from a stream keeps its native buffer alive after the stream goes."""
    import gc

    model = make_lm("bmojo", torch.float64)
    s = model.stream(1)
    s.feed(toks(1, 4))
    ring = s.state["layers.0.ring_k"]
    copy = ring.clone()
    del s
    gc.collect()
    assert torch.equal(ring, copy)
    ring.add_(1.0)  # still writable memory
    assert torch.equal(ring, copy + 1.0)
