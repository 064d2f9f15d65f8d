"""bmojo_core.integrations.transformers: tiny random-config models of every Mamba-family
model the installed transformers has (Mamba-1 and Mamba-2 mixers; no downloads). With
``enable()`` the logits equal transformers' own CPU path, greedy generation is identical
through the cache, a training step's gradients are equal, bf16 runs; ``disable()``
restores the original functions."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from conftest import needs, transformers_with_torch

USABLE = transformers_with_torch()

pytestmark = needs(USABLE, "transformers with PyTorch support")

V = 64


def _models():
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=32, tie_word_embeddings=False)
    mamba_like = dict(common, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4)
    hybrid = dict(common, intermediate_size=64, num_attention_heads=4, mamba_d_state=8,
                  mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)  # fmt: skip
    out = {}
    if hasattr(tf, "MambaConfig"):
        out["mamba"] = (tf.MambaConfig(**mamba_like), tf.MambaForCausalLM)
    if hasattr(tf, "FalconMambaConfig"):
        out["falcon_mamba"] = (tf.FalconMambaConfig(**mamba_like), tf.FalconMambaForCausalLM)
    if hasattr(tf, "JambaConfig"):
        cfg = tf.JambaConfig(**hybrid, num_hidden_layers=2, num_key_value_heads=2, num_experts=2,
                             num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
                             attn_layer_period=2, attn_layer_offset=1)  # fmt: skip
        out["jamba"] = (cfg, tf.JambaForCausalLM)
    if hasattr(tf, "ZambaConfig"):
        cfg = tf.ZambaConfig(**hybrid, num_hidden_layers=6, num_key_value_heads=4,
                             attention_hidden_size=64, attention_head_dim=16, n_mamba_heads=2,
                             attn_layer_period=2, attn_layer_offset=1)  # fmt: skip
        out["zamba"] = (cfg, tf.ZambaForCausalLM)
    # Mamba-2 family: 4 heads of 16, 2 groups, state 8, chunks of 8 (sequences cross them)
    ssd = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2,
               mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=8)  # fmt: skip
    attn = dict(common, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    if hasattr(tf, "Mamba2Config"):
        cfg = tf.Mamba2Config(**common, num_hidden_layers=2, num_heads=4, head_dim=16,
                              state_size=8, n_groups=2, expand=2, conv_kernel=4,
                              chunk_size=8)  # fmt: skip
        out["mamba2"] = (cfg, tf.Mamba2ForCausalLM)
    if hasattr(tf, "BambaConfig"):
        cfg = tf.BambaConfig(**attn, **ssd, num_hidden_layers=2, attn_layer_indices=[1])
        out["bamba"] = (cfg, tf.BambaForCausalLM)
    if hasattr(tf, "GraniteMoeHybridConfig"):
        cfg = tf.GraniteMoeHybridConfig(**attn, **ssd, num_hidden_layers=2, num_local_experts=2,
                                        num_experts_per_tok=1, shared_intermediate_size=64,
                                        layer_types=["mamba", "attention"])  # fmt: skip
        out["granitemoehybrid"] = (cfg, tf.GraniteMoeHybridForCausalLM)
    if hasattr(tf, "FalconH1Config"):
        cfg = tf.FalconH1Config(**attn, **ssd, num_hidden_layers=2, head_dim=8, mamba_d_ssm=64)
        out["falcon_h1"] = (cfg, tf.FalconH1ForCausalLM)
    if hasattr(tf, "NemotronHConfig"):
        cfg = tf.NemotronHConfig(**attn, num_hidden_layers=3, head_dim=8, mamba_num_heads=4,
                                 mamba_head_dim=16, ssm_state_size=8, n_groups=2, expand=2,
                                 conv_kernel=4, chunk_size=8,
                                 hybrid_override_pattern="M*-")  # fmt: skip
        out["nemotron_h"] = (cfg, tf.NemotronHForCausalLM)
    if hasattr(tf, "Zamba2Config"):
        cfg = tf.Zamba2Config(**common, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, mamba_d_state=8, mamba_d_conv=4,
                              mamba_expand=2, mamba_headdim=16, n_mamba_heads=4, mamba_ngroups=2,
                              chunk_size=8, use_shared_attention_adapter=False, adapter_rank=4,
                              layers_block_type=["mamba", "hybrid", "mamba", "hybrid"])  # fmt: skip
        out["zamba2"] = (cfg, tf.Zamba2ForCausalLM)
    return out


MAMBA2 = {"mamba2", "bamba", "granitemoehybrid", "falcon_h1", "nemotron_h", "zamba2"}


MODELS = sorted(_models()) if USABLE else []


@pytest.fixture
def tt():
    from bmojo_core.integrations import transformers as tt

    tt.disable()
    yield tt
    tt.disable()


def _build(name, dtype=torch.float32):
    cfg, cls = _models()[name]
    torch.manual_seed(0)
    return cls(cfg).to(dtype).eval()


def _module(name):
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_generation_equal_transformers(tt, name, monkeypatch):
    calls: dict[str, int] = {}
    scan = "mamba_chunk_scan_combined" if name in MAMBA2 else "selective_scan_fn"
    ops = {scan, "selective_state_update", "causal_conv1d_fn", "causal_conv1d_update"}
    for op in sorted(ops):
        real = getattr(tt, op)

        def counted(*a, _real=real, _op=op, **k):
            calls[_op] = calls.get(_op, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(tt, op, counted)
    model = _build(name)
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        report = tt.enable()
        hooks = tt.MAMBA2_HOOKS if name in MAMBA2 else tt.MAMBA1_HOOKS
        assert set(report.patched[_module(name).__name__]) == set(hooks) - (
            {"mamba_inner_fn"} if name == "zamba" else set()
        )
        got = model(ids).logits
        got_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_gen, want_gen)
    assert set(calls) == ops, calls  # our ops ran


@pytest.mark.parametrize("name", MODELS)
def test_training_step_gradients_equal(tt, name, monkeypatch):
    calls = []
    ops = (
        ("mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined")
        if name in MAMBA2
        else ("selective_scan_fn", "mamba_inner_fn")
    )
    for op in ops:
        real = getattr(tt, op)
        monkeypatch.setattr(tt, op, lambda *a, _r=real, _o=op, **k: calls.append(_o) or _r(*a, **k))
    model = _build(name).train()
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(2))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    want = grads()
    tt.enable()
    got = grads()
    assert calls, f"none of {ops} ran"
    if name == "mamba2":  # trains through the fused block (hybrids with a cache: unfused)
        assert "mamba_split_conv1d_scan_combined" in calls
    if name == "mamba":  # through Mamba-1's fused block (FalconMamba's normed one declines)
        assert "mamba_inner_fn" in calls
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-3, atol=2e-4, msg=k)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_runs(tt, name):
    model = _build(name, torch.bfloat16)
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits.float()
        tt.enable()
        got = model(ids).logits.float()
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 12)
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.1)


@needs("mamba" in MODELS, "transformers with Mamba")
def test_enable_disable_idempotent_and_restoring(tt):
    mod = _module("mamba")
    orig = {n: getattr(mod, n) for n in tt.MAMBA1_HOOKS if hasattr(mod, n)}
    r1, r2 = tt.enable(), tt.enable()
    assert r1.patched == r2.patched and tt.status()
    assert all(getattr(mod, n) is tt.MAMBA1_HOOKS[n] for n in orig)
    tt.disable()
    tt.disable()
    assert all(getattr(mod, n) is f for n, f in orig.items()) and not tt.status()
    with tt.use_bmojo_core() as report:
        assert mod.__name__ in report.patched
        assert mod.mamba_selective_scan is tt.MAMBA1_HOOKS["mamba_selective_scan"]
    assert all(getattr(mod, n) is f for n, f in orig.items())
    assert not report.pending and "mamba_selective_scan" in str(report)


def test_import_is_lazy():
    import subprocess
    import sys

    code = ("import sys, bmojo_core; assert 'transformers' not in sys.modules; "
            "import bmojo_core.integrations; assert 'transformers' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
