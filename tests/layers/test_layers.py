"""B'MOJO layers (design §6.3): parity with the dense pure-torch reference
(``reference.bmojo_layer_ref``: L × 3L masked attention, reference scan/conv/innovation/
store), gradients (gradcheck and autograd of the reference), initialisation, errors,
thread and SIMD-level independence."""

from __future__ import annotations

import math

import bmojo_core
import pytest
import torch
import torch.nn.functional as F
from bmojo_core.layers import BMojoLayer, BMojoLM, SelectiveSSM, SlidingWindowAttention
from bmojo_core.layers import reference as R
from conftest import TOL, assert_close, stable_seed

# (window, n_fading, n_eidetic): B'MOJO, B'MOJO-F, pure SSM, pure SWA, eidetic only,
# more memory than the window.
VARIANTS = [(4, 2, 3), (4, 3, 0), (0, 0, 0), (4, 0, 0), (4, 0, 3), (3, 5, 4)]
VIDS = [f"w{w}-f{f}-e{e}" for w, f, e in VARIANTS]


def make_layer(w, mf, me, dtype=torch.float64, seed=0, d=8, **kw):
    torch.manual_seed(seed)
    return BMojoLayer(d, w, mf, me, d_state=4, n_heads=2, dtype=dtype, **kw)


def rand_u(b, length, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, d, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("length", [1, 3, 12, 23])
def test_layer_matches_dense_reference_fp64(variant, length):
    layer = make_layer(*variant)
    u = rand_u(2, length, 8, torch.float64, stable_seed(variant, length))
    assert_close(layer(u), R.bmojo_layer_ref(layer, u), torch.float64, "layer")


@pytest.mark.parametrize(
    "kw",
    [
        {"innovation_metric": "chi2"},
        {"eidetic_policy": "fifo", "eidetic_threshold": 0.01},
        {"eidetic_policy": "threshold", "eidetic_threshold": 0.02},
        {"innovation_taps": 2},
    ],
    ids=["chi2", "fifo", "threshold", "taps2"],
)
def test_layer_store_options(kw):
    layer = make_layer(4, 2, 3, **kw)
    u = rand_u(2, 21, 8, torch.float64, 5)
    assert_close(layer(u), R.bmojo_layer_ref(layer, u), torch.float64, "layer")


def test_memory_tokens_matter():
    """The memory block changes the output (else the parity tests would be vacuous)."""
    u = rand_u(2, 16, 8, torch.float64, 1)
    full = make_layer(4, 2, 3)
    swa = make_layer(4, 0, 0)
    swa.attn.load_state_dict(full.attn.state_dict())
    assert (full(u) - swa(u))[:, 4:].abs().max() > 1e-3
    # First chunk: no memory yet (every memory key is masked). Not bitwise: the SDPA call
    # with the extra (masked) memory keys is a different computation (other key count, so
    # other blocking/reduction order), equal only up to rounding.
    torch.testing.assert_close(full(u)[:, :4], swa(u)[:, :4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", [(4, 2, 3), (0, 0, 0), (8, 4, 8)], ids=str)
def test_layer_fp32(variant):
    layer = make_layer(*variant, dtype=torch.float32, d=16)
    u = rand_u(2, 40, 16, torch.float32, 3)
    layer64 = make_layer(*variant, dtype=torch.float32, d=16).double()
    layer64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    assert_close(layer(u), R.bmojo_layer_ref(layer64, u.double()), torch.float32, "fp32")


def test_selective_ssm_matches_reference():
    torch.manual_seed(0)
    ssm = SelectiveSSM(8, d_state=4, dtype=torch.float64)
    u = rand_u(3, 17, 8, torch.float64, 2)
    assert_close(ssm(u), R.selective_ssm_ref(ssm, u), torch.float64, "ssm")


def test_sliding_window_attention_memory_dense():
    """Explicit memory tokens: against a per-query loop with softmax over the allowed keys."""
    torch.manual_seed(1)
    w, m, d = 3, 2, 8
    attn = SlidingWindowAttention(d, w, n_heads=2, dtype=torch.float64)
    x = rand_u(2, 10, d, torch.float64, 4)
    nc = 4
    mem = rand_u(2, nc * m, d, torch.float64, 5).view(2, nc, m, d)
    mask = torch.rand(2, nc, m, generator=torch.Generator().manual_seed(6)) > 0.4
    got = attn(x, mem, mask)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    out = torch.zeros_like(x)
    for b in range(2):
        for t in range(10):
            c = t // w
            toks = [x[b, j] for j in range(max(0, t - w + 1), t + 1)]
            toks += [mem[b, c, i] for i in range(m) if mask[b, c, i]]
            kv = torch.stack(toks)
            q = (wq @ x[b, t]).view(2, -1)
            k = (kv @ wk.T).view(len(toks), 2, -1)
            v = (kv @ wv.T).view(len(toks), 2, -1)
            a = torch.softmax(torch.einsum("hd,khd->hk", q, k) / math.sqrt(4), -1)
            out[b, t] = torch.einsum("hk,khd->hd", a, v).reshape(-1)
    assert_close(got, F.linear(out, attn.out_proj.weight), torch.float64, "swa")


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("variant", [(3, 2, 2), (0, 0, 0), (3, 0, 0)], ids=str)
def test_layer_gradcheck(variant):
    torch.manual_seed(2)
    layer = BMojoLayer(4, *variant, d_state=2, n_heads=2, dtype=torch.float64)
    u = rand_u(1, 7, 4, torch.float64, 7).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(u, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (u,))

    assert torch.autograd.gradcheck(f, (u, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
def test_layer_grads_match_reference(variant):
    """Every parameter's and the input's gradient equals the dense reference's."""
    layer = make_layer(*variant)
    u = rand_u(2, 13, 8, torch.float64, stable_seed("g", variant))
    g = rand_u(2, 13, 8, torch.float64, 9)
    u1 = u.clone().requires_grad_()
    (layer(u1) * g).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    u2 = u.clone().requires_grad_()
    (R.bmojo_layer_ref(layer, u2) * g).sum().backward()
    assert_close(u1.grad, u2.grad, torch.float64, "du")
    for n, p in layer.named_parameters():
        if p.grad is None:
            assert n not in got
            continue
        assert_close(got[n], p.grad, torch.float64, n)


def test_lm_gradients_flow():
    torch.manual_seed(0)
    lm = BMojoLM(20, 8, 2, 4, 2, 2, d_state=4, n_heads=2, dtype=torch.float64)
    tok = torch.randint(0, 20, (2, 11))
    F.cross_entropy(lm(tok).flatten(0, 1), tok.roll(-1, 1).flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())


# ----------------------------------------------------------------------------- LM


def test_lm_matches_manual_composition():
    torch.manual_seed(3)
    lm = BMojoLM(30, 8, 2, 4, 2, 3, d_state=4, n_heads=2, dtype=torch.float64)
    tok = torch.randint(0, 30, (2, 14))
    h = lm.embedding.weight[tok]
    for blk in lm.blocks:
        h = h + R.bmojo_layer_ref(
            blk.mixer, F.layer_norm(h, (8,), blk.norm1.weight, blk.norm1.bias)
        )
        m = blk.mlp
        h2 = F.layer_norm(h, (8,), blk.norm2.weight, blk.norm2.bias)
        h = h + m[2](F.gelu(m[0](h2)))
    ref = F.layer_norm(h, (8,), lm.norm_f.weight, lm.norm_f.bias) @ lm.embedding.weight.T
    assert_close(lm(tok), ref, torch.float64, "lm")


# ----------------------------------------------------------------------------- init


def test_mamba_initialisation():
    torch.manual_seed(0)
    ssm = SelectiveSSM(64, d_state=16)
    assert ssm.d_inner == 128 and ssm.dt_rank == 4 and ssm.conv_weight.shape == (128, 4)
    assert ssm.x_proj.weight.shape == (4 + 32, 128)
    dt = F.softplus(ssm.dt_proj.bias.double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # spread log-uniformly, not constant
    assert torch.allclose(-torch.exp(ssm.A_log[0]), -torch.arange(1.0, 17.0))
    assert torch.equal(ssm.D, torch.ones(128))
    assert ssm.dt_proj.weight.abs().max() <= 4**-0.5


def test_variant_structure():
    assert make_layer(4, 0, 0).ssm is None  # pure SWA: no SSM
    assert make_layer(0, 0, 0).attn is None  # pure SSM: no attention
    u = rand_u(1, 9, 8, torch.float64, 0)
    ssm_only = make_layer(0, 0, 0)
    # Bitwise: the pure-SSM layer returns its SSM's output, the very same call on the same
    # input (no other arithmetic).
    assert torch.equal(ssm_only(u), ssm_only.ssm(u))


# ----------------------------------------------------------------------------- errors


def test_errors():
    layer = make_layer(4, 2, 3)
    with pytest.raises(bmojo_core.BmojoValueError, match="u: expected shape"):
        layer(torch.zeros(2, 5, 7, dtype=torch.float64))
    with pytest.raises(bmojo_core.BmojoTypeError, match="u: expected dtype float64"):
        layer(torch.zeros(2, 5, 8))
    with pytest.raises(bmojo_core.BmojoValueError, match="window"):
        BMojoLayer(8, 0, 2, 0)
    with pytest.raises(bmojo_core.BmojoValueError, match="n_heads"):
        BMojoLayer(8, 4, 0, 0, n_heads=3)
    with pytest.raises(bmojo_core.BmojoValueError, match="eidetic_policy"):
        BMojoLayer(8, 4, 0, 2, eidetic_policy="lru")
    with pytest.raises(bmojo_core.BmojoTypeError, match="window"):
        BMojoLayer(8, 4.0, 0, 0)
    lm = BMojoLM(10, 8, 1, 4, 0, 0)
    with pytest.raises(bmojo_core.BmojoValueError, match="token id 10"):
        lm(torch.tensor([[1, 10]]))
    with pytest.raises(bmojo_core.BmojoTypeError, match="tokens"):
        lm(torch.zeros(1, 3))


# ----------------------------------------------------------------------------- runtime


def test_thread_count_bitwise(restore_runtime):
    layer = make_layer(4, 2, 3, dtype=torch.float32, d=16)
    u = rand_u(3, 37, 16, torch.float32, 8)
    outs = []
    for n in (1, 2, 3):
        bmojo_core.set_num_threads(n)
        outs.append(layer(u))
    # Bitwise: the same computation (set_num_threads sizes only bmojo_core's pool, whose
    # kernels are thread-count invariant; torch's ops run unchanged).
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("level", bmojo_core.simd_levels())
def test_simd_levels(level, restore_runtime):
    bmojo_core.set_simd_level(level)
    layer = make_layer(4, 2, 3, dtype=torch.float32, d=16)
    u = rand_u(2, 30, 16, torch.float32, 9)
    ref64 = make_layer(4, 2, 3, dtype=torch.float32, d=16).double()
    ref64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    torch.testing.assert_close(
        layer(u).double(), R.bmojo_layer_ref(ref64, u.double()), **TOL[torch.float32]
    )


def test_lm_from_config_or_fields():
    """``BMojoLM(config)`` and ``BMojoLM(**fields)`` build the same model; the config
    carries every field once, checks the model's own four and feeds the layers the rest."""
    from bmojo_core.layers import BMojoConfig

    kw = dict(vocab_size=20, d_model=8, n_layers=2, window=4, n_fading=1, n_eidetic=2)
    cfg = BMojoConfig(**kw, d_state=4, n_heads=2, innovation_metric="chi2")
    torch.manual_seed(0)
    a = BMojoLM(cfg)
    torch.manual_seed(0)
    b = BMojoLM(*kw.values(), d_state=4, n_heads=2, innovation_metric="chi2")
    assert a.config == b.config == cfg and isinstance(a.config.eidetic_threshold, float)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na  # same draws, same parameters
    assert a.blocks[0].mixer.innovation_metric == "chi2" and a.blocks[0].mixer.n_eidetic == 2
    with pytest.raises(bmojo_core.BmojoValueError, match="vocab_size: expected an int >= 1"):
        BMojoConfig(**{**kw, "vocab_size": 0})
    with pytest.raises(bmojo_core.BmojoTypeError, match="mlp_ratio"):
        BMojoLM(**kw, mlp_ratio=2.5)
    with pytest.raises(TypeError):
        BMojoLM(**kw, not_a_field=1)
