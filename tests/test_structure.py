"""The package's layering (docs/design.md §8): every import inside ``bmojo_core`` points to
its own layer or a lower one, nothing imports from the package ``__init__``, only the ops
and the runtime reach the extension, no two modules import each other (directly or
around a loop; imports inside functions count), and the package ``__init__`` only
re-exports. Read from the sources with ``ast``, so a violation fails here whatever is
imported at test time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bmojo_core
import pytest

PKG = Path(bmojo_core.__file__).parent
ROOT = "bmojo_core"

# Rank of each top-level part of the package: a module may import only ranks <= its own.
RANKS = {
    "errors": 0,
    "_validate": 0,
    "_core": 0,
    "runtime": 1,
    "ops": 2,
    "inference": 3,
    "layers": 4,
    "realization": 4,
    "integrations": 4,
    "distributed": 4,
    "testing": 5,
    "train": 5,
    "mqar": 5,
    "bench": 5,
    "cli": 5,
}
# The only parts that may call the extension.
CORE_USERS = ("runtime", "ops")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(imported module, line, imported name or '') for every import statement in the
    module, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = name if is_package(name, mods) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                # `from pkg import mod` imports the module pkg.mod.
                out.append((sub, node.lineno, "") if sub in mods or sub == f"{ROOT}._core"
                           else (target, node.lineno, a.name))  # fmt: skip
    return [(t, line, n) for t, line, n in out if t == ROOT or t.startswith(ROOT + ".")]


def part(name: str) -> str:
    return name.split(".")[1] if name.count(".") else ""


def edges() -> dict[str, set[str]]:
    """Module → the package's modules its imports run (the target and every package above
    it that the importer is not inside of)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _, _ in imports(name, path, mods):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                t = ".".join(parts[:i])
                if t in mods and not (name == t or name.startswith(t + ".")):
                    graph[name].add(t)
    return graph


def test_imports_follow_the_layers():
    mods = modules()
    bad = []
    for name, path in mods.items():
        if name == ROOT:
            continue
        src = part(name)
        for target, line, what in imports(name, path, mods):
            if target == ROOT:
                bad.append(
                    f"{name}:{line} imports {what or 'bmojo_core'} from the package __init__"
                )
                continue
            dst = part(target)
            if RANKS[dst] > RANKS[src]:
                bad.append(f"{name}:{line} ({src}, rank {RANKS[src]}) imports {target} "
                           f"({dst}, rank {RANKS[dst]})")  # fmt: skip
            if dst == "_core" and src not in CORE_USERS:
                bad.append(f"{name}:{line} calls the extension directly (only {CORE_USERS} may)")
    assert not bad, "\n".join(bad)


def test_every_part_has_a_rank():
    assert {part(m) for m in modules() if m != ROOT} <= set(RANKS)


def test_no_import_cycles():
    graph = edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_catch_violations(tmp_path, monkeypatch):
    """The checks above fail on a cycle (through a function-level import), an upward
    import, an import from the package __init__ and a direct call of the extension."""
    fake = tmp_path / ROOT
    (fake / "ops").mkdir(parents=True)
    (fake / "__init__.py").write_text("from .ops import a\n")
    (fake / "ops" / "__init__.py").write_text("")
    (fake / "ops" / "a.py").write_text("def f():\n    from . import b\n")
    (fake / "ops" / "b.py").write_text("from .a import f\nfrom ..layers import x\n")
    (fake / "layers.py").write_text("from bmojo_core import ops\n")
    (fake / "cli.py").write_text("from bmojo_core import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match=r"(?s)rank 2\).*rank 4\).*cli:1 imports f from"):
        test_imports_follow_the_layers()
    (fake / "ops" / "a.py").write_text("def f():\n    pass\n")
    (fake / "ops" / "b.py").write_text("from .a import f\n")
    (fake / "cli.py").write_text("from .ops import a\n")
    test_no_import_cycles()
    test_imports_follow_the_layers()
    (fake / "layers.py").write_text("from . import _core\n")
    with pytest.raises(AssertionError, match="calls the extension directly"):
        test_imports_follow_the_layers()


def test_package_init_only_reexports():
    tree = ast.parse((PKG / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] in (
            ["__all__"],
            ["__version__"],
        ):
            continue
        pytest.fail(f"bmojo_core/__init__.py:{node.lineno} does more than re-export")


def test_import_needs_no_gpu_and_no_optional_package():
    # Compared with what torch alone imports (some torch builds import tqdm themselves).
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import bmojo_core\n"
        "opt = ('hypothesis', 'matplotlib', 'tqdm', 'control', 'transformers', 'pytest')\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in opt if m in new), torch.cuda.is_initialized())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[] False"
