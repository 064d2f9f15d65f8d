"""Reports of the MQAR experiment: the accuracy table, a summary, plots and the results
files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "plot_accuracy", "plot_sweep", "save_results", "summarize"]


def _cells(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """model → str(N) → the run (older results without intervals get them empty)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results["runs"]:
        out.setdefault(r["model"], {})[str(r["num_kv"])] = r
    return out


def format_table(results: dict[str, Any]) -> str:
    """The accuracy table: rows = models (or sweep variants), columns = N: test accuracy
    in % with its 95 % interval over the test queries; then the negative flip rate
    B'MOJO-F → B'MOJO (% of test queries) when both were run; then the ceiling of each
    attention model (% of test queries whose answer its window and eidetic tokens can
    hold)."""
    nkv = [str(n) for n in results["config"]["num_kv"]]
    cells = _cells(results)

    def acc_cell(m: str, n: str) -> str:
        run = cells.get(m, {}).get(n, {})
        a = results["accuracy"][m][n]
        if "ci95" not in run:
            return f"{100 * a:.1f}"
        lo, hi = run["ci95"]
        return f"{100 * a:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"

    rows = [[results["models"][m]["label"]] + [acc_cell(m, n) for n in nkv]
            for m in results["accuracy"]]  # fmt: skip
    if "flip_rate" in results:
        rows.append(["neg. flip F→B'MOJO"] + [f"{100 * results['flip_rate'][n]:.1f}" for n in nkv])
    ceil_rows = []
    for m in results["accuracy"]:
        c = [cells.get(m, {}).get(n, {}).get("ceiling") for n in nkv]
        if any(v is not None for v in c):
            ceil_rows.append([f"  {results['models'][m]['label']}"]
                             + ["-" if v is None else f"{100 * v:.1f}" for v in c])  # fmt: skip
    head = ["accuracy % (95% interval)"] + [f"N={n}" for n in nkv]
    sub = ["ceiling % (window + eidetic)"] + [""] * len(nkv)
    table = [head, *rows] + ([sub, *ceil_rows] if ceil_rows else [])
    width = [max(len(r[i]) for r in table) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        cells_ = [c.rjust(w) for c, w in zip(r[1:], width[1:], strict=True)]
        return "  ".join([r[0].ljust(width[0]), *cells_]).rstrip()

    out = [line(head), "  ".join("-" * w for w in width)]
    out += [line(r) for r in rows]
    if ceil_rows:
        out += [line(sub)] + [line(r) for r in ceil_rows]
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
