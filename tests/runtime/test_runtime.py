"""Runtime controls: version, SIMD level, threads, environment variables, fork, CUDA."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import bmojo_core as bm
import pytest
import torch
from conftest import make_scan_inputs


def _python(code: str, **env) -> str:
    e = {k: v for k, v in os.environ.items() if not k.startswith("BMOJO_")}
    e.update(env)
    res = subprocess.run(
        [sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_version():
    assert isinstance(bm.__version__, str) and bm.__version__
    assert bm.__version__[0].isdigit()


def test_simd_levels(restore_runtime):
    levels = bm.simd_levels()
    assert isinstance(levels, list) and levels
    assert all(isinstance(x, str) for x in levels)
    assert levels[-1] == "scalar"
    assert len(set(levels)) == len(levels)
    assert bm.simd_level() in levels
    for level in levels:
        bm.set_simd_level(level)
        assert bm.simd_level() == level
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert "sse2" in levels
        flags = open("/proc/cpuinfo").read()
        assert ("avx2" in levels) == (" avx2" in flags and " fma" in flags)
        assert ("avx512" in levels) == (" avx512f" in flags)


def test_default_simd_level_is_best():
    out = _python("import bmojo_core as b; print(b.simd_level(), b.simd_levels()[0])")
    level, best = out.split()
    assert level == best


@pytest.mark.parametrize("bad", ["bogus", "", "AVX9", "neon-x"])
def test_set_simd_level_unknown(bad, restore_runtime):
    before = bm.simd_level()
    with pytest.raises(bm.BmojoValueError):
        bm.set_simd_level(bad)
    assert bm.simd_level() == before


def test_set_simd_level_unsupported(restore_runtime):
    known = {"avx512", "avx2", "sse2", "neon", "scalar"}
    unsupported = sorted(known - set(bm.simd_levels()))
    for level in unsupported:
        with pytest.raises(bm.BmojoValueError):
            bm.set_simd_level(level)


def test_threads(restore_runtime):
    n = bm.get_num_threads()
    assert isinstance(n, int) and n >= 1
    bm.set_num_threads(1)
    assert bm.get_num_threads() == 1
    bm.set_num_threads(3)
    assert bm.get_num_threads() == 3
    kw = make_scan_inputs(2, 8, 4, 16, dtype=torch.float32, seed=1)
    out3 = bm.selective_scan_fn(**kw)
    bm.set_num_threads(1)
    assert torch.equal(out3, bm.selective_scan_fn(**kw))


@pytest.mark.parametrize("bad", [0, -1])
def test_set_num_threads_invalid(bad, restore_runtime):
    before = bm.get_num_threads()
    with pytest.raises(bm.BmojoValueError):
        bm.set_num_threads(bad)
    assert bm.get_num_threads() == before


def test_env_simd_level():
    assert _python("import bmojo_core as b; print(b.simd_level())", BMOJO_SIMD="scalar") == (
        "scalar"
    )
    sse = "sse2" if os.uname().machine == "x86_64" else None
    if sse:
        assert _python("import bmojo_core as b; print(b.simd_level())", BMOJO_SIMD=sse) == sse


def test_env_num_threads():
    assert (
        _python("import bmojo_core as b; print(b.get_num_threads())", BMOJO_NUM_THREADS="1") == "1"
    )
    assert (
        _python("import bmojo_core as b; print(b.get_num_threads())", BMOJO_NUM_THREADS="3") == "3"
    )


def test_env_scan_runs_with_scalar_single_thread():
    code = (
        "import torch, bmojo_core as b\n"
        "u = torch.randn(2, 3, 9); d = torch.rand(2, 3, 9); A = -torch.rand(3, 4)\n"
        "B = torch.randn(2, 4, 9); C = torch.randn(2, 4, 9)\n"
        "o = b.selective_scan_fn(u, d, A, B, C)\n"
        "r = b.reference.selective_scan(u, d, A, B, C)\n"
        "print(b.simd_level(), b.get_num_threads(), bool(torch.allclose(o, r, 1e-4, 1e-4)))"
    )
    assert _python(code, BMOJO_SIMD="scalar", BMOJO_NUM_THREADS="1") == "scalar 1 True"


def _child_scan(kw):
    out = bm.selective_scan_fn(**kw)
    return out.numpy()


def test_fork_safety(restore_runtime):
    """After the thread pool ran in the parent, a forked child can still run scans."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    bm.set_num_threads(2)
    kw = make_scan_inputs(2, 32, 8, 64, dtype=torch.float32, seed=2, initial_state=True)
    expected = bm.selective_scan_fn(**kw)  # parent uses the pool before forking
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_scan, (kw,)).get(timeout=120)
        got2 = pool.apply_async(_child_scan, (kw,)).get(timeout=120)
    assert torch.equal(torch.from_numpy(got), expected)
    assert torch.equal(torch.from_numpy(got2), expected)
    # and the parent still works afterwards
    assert torch.equal(bm.selective_scan_fn(**kw), expected)


def test_import_does_not_initialise_cuda():
    code = "import torch, bmojo_core\nprint(torch.cuda.is_initialized())"
    assert _python(code) == "False"


def test_public_names():
    for name in (
        "selective_scan_fn",
        "selective_state_update",
        "diag_scan",
        "reference",
        "BmojoError",
        "BmojoValueError",
        "BmojoTypeError",
        "simd_level",
        "simd_levels",
        "set_simd_level",
        "set_num_threads",
        "get_num_threads",
        "__version__",
    ):
        assert hasattr(bm, name), name


def test_core_stubs_match_the_extension():
    """The stub package ``_core/`` stays true: one ``.pyi`` per submodule of the compiled
    module, with the same names, and the same parameter names (PyO3 records each
    function's signature in ``__text_signature__``)."""
    import ast
    import inspect
    from pathlib import Path

    from bmojo_core import _core

    def stub_params(fn, skip_self: bool) -> list[str]:
        names = [a.arg for a in fn.args.args]
        return names[1:] if skip_self else names

    def check_class(cls, node, what):
        """Methods of a stub class: the same public names as the class, the same
        parameters; ``__init__`` is the constructor's signature."""
        methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        public = {n for n in dir(cls) if not n.startswith("_")}
        assert set(methods) - {"__init__"} == public, what
        for name, fn in methods.items():
            static = any(getattr(d, "id", None) == "staticmethod" for d in fn.decorator_list)
            target = cls if name == "__init__" else getattr(cls, name)
            got = list(inspect.signature(target).parameters)
            want = stub_params(fn, skip_self=not static)
            if name != "__init__" and not static:
                got = got[1:] if got[:1] == ["self"] else got
            assert got == want, f"{what}.{name}: {got} != {want}"
        assert "__init__" in methods or not hasattr(cls, "__text_signature__"), what

    stubs = Path(bm.__file__).parent / "_core"
    assert not (stubs / "__init__.py").exists(), "the stub folder must not shadow the .so"
    assert _core.__file__.endswith((".so", ".pyd")), _core.__file__
    subs = {p.stem for p in stubs.glob("*.pyi")} - {"__init__"}
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert subs == public
    for sub in sorted(subs):
        mod = getattr(_core, sub)
        stub = ast.parse((stubs / f"{sub}.pyi").read_text())
        declared = {}
        for node in stub.body:
            if isinstance(node, ast.FunctionDef):
                declared[node.name] = [a.arg for a in node.args.args]
            elif isinstance(node, ast.ClassDef):
                declared[node.name] = None
                check_class(getattr(mod, node.name), node, f"{sub}.{node.name}")
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if not node.target.id.startswith("_"):
                    declared[node.target.id] = None
        assert set(declared) == {n for n in dir(mod) if not n.startswith("_")}, sub
        for name, params in declared.items():
            if params is not None:
                got = list(inspect.signature(getattr(mod, name)).parameters)
                assert got == params, f"{sub}.{name}"


def test_core_submodules_import_by_name():
    """Each submodule is an attribute of ``_core`` and importable by its full name."""
    import importlib

    from bmojo_core import _core

    for sub in ("runtime", "scan", "step", "conv", "companion", "bilinear", "eidetic"):
        mod = importlib.import_module(f"bmojo_core._core.{sub}")
        assert mod is getattr(_core, sub)
        assert mod.__name__ == f"bmojo_core._core.{sub}"
    from bmojo_core._core import cuda, decode

    assert decode.DecodePlan.__module__ == "bmojo_core._core.decode"
    assert cuda.__name__ == "bmojo_core._core.cuda"


def test_core_raises_the_package_errors():
    """Kernel, argument and type errors of the extension come as ``bmojo_core.errors``
    classes (still ValueError / TypeError)."""
    import numpy as np
    from bmojo_core._core import eidetic, runtime

    with pytest.raises(bm.BmojoValueError, match="simd level"):
        runtime.set_simd_level("nope")
    pos = np.array([[0, 0]], dtype=np.int64)
    sc, cnt = np.zeros((1, 2)), np.array([2], dtype=np.int64)
    with pytest.raises(bm.BmojoValueError, match="row 0: positions: a position is held twice"):
        eidetic.check(pos, sc, cnt, "topk", 0.0)
    with pytest.raises(bm.BmojoTypeError, match="positions"):
        eidetic.check(pos.astype(np.int32), sc, cnt, "topk", 0.0)
