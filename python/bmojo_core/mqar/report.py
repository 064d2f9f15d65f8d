"""Reports of the MQAR experiment: the accuracy table, a summary, plots and the results
files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CLAIMS",
    "format_table",
    "orderings",
    "plot_accuracy",
    "plot_budget",
    "plot_sweep",
    "save_results",
    "summarize",
]


def format_table(results: dict[str, Any]) -> str:
    """The accuracy table: rows = models (or sweep variants), columns = N: test accuracy
    in % (the mean over seeds) with its 95 % interval over the test queries; then the
    negative flip rate B'MOJO-F → B'MOJO (% of test queries) when both were run; the
    seed-to-seed spread (lowest-highest accuracy) with several seeds; and the ceiling of
    each attention model (% of test queries whose answer its window and eidetic tokens can
    hold)."""
    nkv = [str(n) for n in results["config"]["num_kv"]]
    models = list(results["accuracy"])
    ci, ceiling = results.get("ci95", {}), results.get("ceiling", {})

    def pct(v: float) -> str:
        return f"{100 * v:.1f}"

    def acc_cell(m: str, n: str) -> str:
        a = pct(results["accuracy"][m][n])
        return f"{a} ({pct(ci[m][n][0])}-{pct(ci[m][n][1])})" if m in ci else a

    rows = [[results["models"][m]["label"]] + [acc_cell(m, n) for n in nkv] for m in models]
    if "flip_rate" in results:
        rows.append(["neg. flip F→B'MOJO"] + [pct(results["flip_rate"][n]) for n in nkv])
    sections = []
    if "spread" in results:
        sections.append([f"seed spread % ({results['config']['seeds']} seeds)"] + [""] * len(nkv))
        sections += [[f"  {results['models'][m]['label']}"]
                     + [f"{pct(results['spread'][m][n][0])}-{pct(results['spread'][m][n][1])}"
                        for n in nkv] for m in models]  # fmt: skip
    bounded = [m for m in models if any(ceiling.get(m, {}).get(n) is not None for n in nkv)]
    ceil_rows = [[f"  {results['models'][m]['label']}"]
                 + ["-" if ceiling[m][n] is None else pct(ceiling[m][n]) for n in nkv]
                 for m in bounded]  # fmt: skip
    if ceil_rows:
        sections += [["ceiling % (window + eidetic)"] + [""] * len(nkv), *ceil_rows]
    head = ["accuracy % (95% interval)"] + [f"N={n}" for n in nkv]
    table = [head, *rows, *sections]
    width = [max(len(r[i]) for r in table) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        cells = [c.rjust(w) for c, w in zip(r[1:], width[1:], strict=True)]
        return "  ".join([r[0].ljust(width[0]), *cells]).rstrip()

    out = [line(head), "  ".join("-" * w for w in width)]
    out += [line(r) for r in rows + sections]
    out.append(f"chance = 1/(V/2) = {100 * results['chance']:.2f}%")
    return "\n".join(out)


# The paper's claims, as "first recalls more than second".
CLAIMS: tuple[tuple[str, str], ...] = (
    ("bmojo", "bmojo-f"), ("bmojo", "swa"), ("bmojo", "ssm"), ("bmojo-f", "ssm"),
    ("swa", "ssm"), ("bmojo-f", "swa"),
)  # fmt: skip


def _range(results: dict[str, Any], m: str, n: str) -> tuple[float, float]:
    """The plausible range of model ``m``'s accuracy at ``n``: the widest of its pooled 95 %
    interval and, per seed, that seed's interval."""
    lo, hi = results["ci95"][m][n]
    for r in results["runs"]:
        if r["model"] == m and str(r["num_kv"]) == n and "ci95" in r:
            lo, hi = min(lo, r["ci95"][0]), max(hi, r["ci95"][1])
    return lo, hi


def orderings(results: dict[str, Any]) -> dict[str, dict[str, str]]:
    """For each claim of :data:`CLAIMS` whose two models were run, per N: ``"holds"`` when
    the first model's range (:func:`_range`: its 95 % interval, widened by every seed's
    own) lies above the second's, ``"reversed"`` when below, else ``"within noise"``."""
    out: dict[str, dict[str, str]] = {}
    acc = results["accuracy"]
    if "ci95" not in results:
        return out
    for a, b in CLAIMS:
        if a not in acc or b not in acc:
            continue
        verdict = {}
        for n in acc[a]:
            (alo, ahi), (blo, bhi) = _range(results, a, n), _range(results, b, n)
            verdict[n] = "holds" if alo > bhi else "reversed" if ahi < blo else "within noise"
        out[f"{a}>{b}"] = verdict
    return out


def summarize(results: dict[str, Any]) -> str:
    """A few lines stating what the table shows: best model per N, B'MOJO vs B'MOJO-F;
    for the eidetic sweep, the best ``n_eidetic`` per N and where accuracy stops rising."""
    acc = results["accuracy"]
    labels = {m: results["models"][m]["label"] for m in acc}
    nkv = [str(n) for n in results["config"]["num_kv"]]
    lines = []
    if "budget" in results:
        return _summarize_budget(results)
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
    chance = results["chance"]
    if "ci95" in results:
        above = [
            f"{labels[m]} {sum(results['ci95'][m][n][0] > chance for n in nkv)}/{len(nkv)}"
            for m in acc
        ]
        lines.append("above chance beyond the 95% interval, values of N: " + ", ".join(above))
    noise = "intervals and the seed spread" if "spread" in results else "95% intervals"
    for claim, verdict in orderings(results).items():
        a, b = claim.split(">")
        held = [n for n in nkv if verdict[n] == "holds"]
        rev = [n for n in nkv if verdict[n] == "reversed"]
        text = f"{labels[a]} > {labels[b]}: holds beyond the {noise} at N = "
        text += ", ".join(held) if held else "none"
        if rev:
            text += f"; reversed at N = {', '.join(rev)}"
        lines.append(text)
    return "\n".join(lines)


def _by_model(budget: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The budget sweep's variants per model (in run order), smallest memory first."""
    out: dict[str, list[str]] = {}
    for k in sorted(budget, key=lambda k: budget[k]["floats"]):
        out.setdefault(budget[k]["model"], []).append(k)
    return {m: out[m] for m in dict.fromkeys(b["model"] for b in budget.values())}


def _summarize_budget(results: dict[str, Any]) -> str:
    """Per N: each model's accuracy from its smallest to its largest memory, whether the
    largest beats the smallest beyond their intervals, and the best model at about equal
    memory (the largest budget every model reaches)."""
    budget, acc, ci = results["budget"], results["accuracy"], results["ci95"]
    labels = {k: results["models"][k]["label"] for k in acc}
    variants = _by_model(budget)
    lines = []
    for n in (str(n) for n in results["config"]["num_kv"]):
        parts = []
        for m, keys in variants.items():
            trend = " -> ".join(f"{100 * acc[k][n]:.1f}" for k in keys)
            gain = ci[keys[-1]][n][0] > ci[keys[0]][n][1]
            parts.append(f"{m} {trend}%" + (" (rises beyond noise)" if gain else ""))
        lines.append(f"N={n}: accuracy with growing memory: " + "; ".join(parts))
        cap = min(budget[keys[-1]]["floats"] for keys in variants.values())
        # each model's largest variant within the cap (keys run smallest memory first)
        fair = [[k for k in keys if budget[k]["floats"] <= cap] for keys in variants.values()]
        fair = [ks[-1] for ks in fair if ks]
        if fair:
            best = max(fair, key=lambda k: acc[k][n])
            lines.append(
                f"N={n}: best within {cap} floats: {labels[best]} ({100 * acc[best][n]:.1f}%, "
                f"{budget[best]['floats']} floats)"
            )
    return "\n".join(lines)


def plot_budget(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes a PNG of test accuracy vs memory budget (floats, log scale), one panel per N,
    one line per model with its 95 % intervals (the paper's figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    nkv = [str(n) for n in results["config"]["num_kv"]]
    budget, acc, ci = results["budget"], results["accuracy"], results["ci95"]
    top = min(1.0, 1.15 * max(ci[k][n][1] for k in budget for n in nkv) + 0.02)
    names = {"ssm": "SSM", "swa": "SWA", "bmojo-f": "B'MOJO-F", "bmojo": "B'MOJO"}
    fig = Figure(figsize=(3.2 * len(nkv), 3.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(nkv), squeeze=False)[0]
    for ax, n in zip(axes, nkv, strict=True):
        for m, keys in _by_model(budget).items():
            x = [budget[k]["floats"] for k in keys]
            y = [acc[k][n] for k in keys]
            err = [[y[i] - ci[k][n][0] for i, k in enumerate(keys)],
                   [ci[k][n][1] - y[i] for i, k in enumerate(keys)]]  # fmt: skip
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=names.get(m, m))
        ax.axhline(results["chance"], color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, top)
        ax.set_title(f"N={n}", fontsize=9)
        ax.set_xlabel("memory (floats)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle(_title(results), fontsize=9)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


def _title(results: dict[str, Any]) -> str:
    c = results["config"]
    how = "mixture of N" if c["mixture"] else "one training per N"
    if c.get("short_frac"):
        how += f", {c['short_frac']:.0%} of steps on short rows (L={c['short_len']})"
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
    """Writes ``results.json`` and ``accuracy.png`` (the sweeps: ``eidetic_sweep.png``,
    ``budget_sweep.png``;
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
    if "budget" in results:
        paths["png"] = os.path.join(out_dir, "budget_sweep.png")
        plot_budget(results, paths["png"])
    elif "sweep" in results:
        paths["png"] = os.path.join(out_dir, "eidetic_sweep.png")
        plot_sweep(results, paths["png"])
    else:
        paths["png"] = os.path.join(out_dir, "accuracy.png")
        plot_accuracy(results, paths["png"])
    return paths
