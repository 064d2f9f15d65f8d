"""The installed wheel, as a user meets it (run by ``scripts/wheel_test.sh``).

These tests run only inside the fresh virtual environments of ``scripts/wheel_test.sh``
(``BMOJO_WHEEL_TEST=1``), where the wheel from ``dist/`` is installed and no Rust toolchain
is on ``PATH``; the rest of the wheel-facing subset (every op against its reference,
autograd, streaming, the MQAR CLI, the transformers integration) runs there beside them.
``BMOJO_SDIST_WHEEL`` names the wheel that ``pip`` built from the sdist, compared here with
the release wheel ``BMOJO_WHEEL``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("BMOJO_WHEEL_TEST") != "1", reason="runs in scripts/wheel_test.sh"
)

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def _bmojo_script() -> str:
    exe = shutil.which("bmojo")
    assert exe is not None, "the wheel's console script 'bmojo' is not on PATH"
    return exe


def test_imported_from_the_installed_wheel():
    import bmojo_core

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    pkg = Path(bmojo_core.__file__).resolve().parent
    assert pkg.parent == site, f"bmojo_core imported from {pkg}, not from the venv's {site}"
    assert not pkg.is_relative_to(ROOT), "the source tree's package was imported"
    (ext,) = [p.name for p in pkg.iterdir() if p.name.startswith("_core.")]
    assert ext == "_core.abi3.so", ext
    assert bmojo_core.__version__ == _pyproject_version()


def test_wheel_tag_is_abi3_manylinux():
    """The installed distribution is the wheel file the script installed, tagged cp310-abi3;
    the release wheel's policy is manylinux_2_28 or older."""
    from importlib.metadata import distribution

    installed = Path(os.environ["BMOJO_WHEEL_INSTALLED"]).name
    wheel = distribution("bmojo_core").read_text("WHEEL")
    tags = re.findall(r"^Tag: (\S+)$", wheel, re.M)
    assert len(tags) == 1, wheel
    assert installed.endswith(f"-{tags[0]}.whl"), (installed, tags)
    py, abi, plat = tags[0].split("-")
    assert (py, abi) == ("cp310", "abi3")
    if installed == Path(os.environ["BMOJO_WHEEL"]).name:
        m = re.fullmatch(r"manylinux_2_(\d+)_x86_64", plat)
        assert m and int(m.group(1)) <= 28, plat
    else:  # built by pip from the sdist: for this machine only
        assert plat == "linux_x86_64", plat


def test_no_rust_toolchain_on_path():
    for tool in ("cargo", "rustc", "maturin"):
        assert shutil.which(tool) is None, f"{tool} is on PATH: {shutil.which(tool)}"


def test_runs_without_touching_the_source_tree(tmp_path):
    code = (
        "import torch, bmojo_core as b\n"
        "u = torch.randn(1, 4, 16, dtype=torch.float64)\n"
        "d = torch.rand(1, 4, 16, dtype=torch.float64)\n"
        "A = -torch.rand(4, 3, dtype=torch.float64)\n"
        "B = torch.randn(1, 3, 16, dtype=torch.float64)\n"
        "C = torch.randn(1, 3, 16, dtype=torch.float64)\n"
        "from bmojo_core.ops.reference import selective_scan\n"
        "torch.testing.assert_close(b.selective_scan_fn(u, d, A, B, C),\n"
        "                           selective_scan(u, d, A, B, C))\n"
        "print(b.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).resolve().is_relative_to(ROOT)


def test_cli_info():
    import torch

    out = subprocess.run([_bmojo_script(), "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _pyproject_version() in out.stdout
    assert torch.__version__ in out.stdout
    import bmojo_core

    assert bmojo_core.simd_level() in out.stdout


def test_cli_version():
    out = subprocess.run([_bmojo_script(), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"bmojo_core {_pyproject_version()}"


def _members(path: str) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


@pytest.mark.skipif(not os.environ.get("BMOJO_SDIST_WHEEL"), reason="no sdist-built wheel given")
def test_sdist_builds_the_same_wheel():
    """The wheel pip builds from the sdist (only Rust and pip on that machine) holds the same
    files as the release wheel: every Python file, stub and metadata file byte for byte;
    the extension module is the same module (same exported init symbol), linked for the
    building machine (tag ``linux_x86_64``: a local build, not a portable one)."""
    release = _members(os.environ["BMOJO_WHEEL"])
    built = _members(os.environ["BMOJO_SDIST_WHEEL"])
    assert sorted(release) == sorted(built)
    linked = {"bmojo_core/_core.abi3.so"}
    generated = {n for n in release if n.endswith(("/RECORD", "/WHEEL")) or "/sboms/" in n}
    for name in sorted(set(release) - linked - generated):
        assert release[name] == built[name], f"{name} differs between the wheels"
    for name in linked:
        for blob in (release[name], built[name]):
            assert blob[:4] == b"\x7fELF" and b"PyInit__core" in blob
    wheel_file = next(n for n in release if n.endswith("/WHEEL"))
    assert re.search(rb"^Tag: cp310-abi3-manylinux_2_\d+_x86_64$", release[wheel_file], re.M)
    assert re.search(rb"^Tag: cp310-abi3-linux_x86_64$", built[wheel_file], re.M)
    digest = {n: hashlib.sha256(release[n]).hexdigest()[:12] for n in linked}
    print("release extension", digest)
