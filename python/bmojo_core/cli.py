"""The ``bmojo`` command line.

::

    bmojo info                                   # versions, SIMD level, threads, CUDA
    bmojo bench [--quick] [--json PATH] [--only NAME] [--threads N] [--simd LEVEL]
    bmojo mqar  [--quick] [--out DIR] [--models M ...] [--num-kv N ...] [--steps S]
                [--batch-size B] [--lr LR] [--model-lr MODEL=LR ...] [--ssm-lr LR]
                [--per-n] [--short-frac F] [--short-len L] [--eidetic-sweep E,E,...]
                [--budget-sweep [K,K,...]]
                [--seed S] [--seeds K] [--resume DIR] [--schedule {cosine,greedy}]
                [--workers W] [--threads N] [--nproc P] [--micro-batches K]
                [--no-progress]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _cuda_rows() -> list[tuple[str, str]]:
    """CUDA runtime facts: device, driver, NVRTC, kernel cache (or why not available)."""
    from .runtime import cuda

    c = cuda.info()
    if c["cuda"]:
        device = f"{c['device']} (compute {c['capability']}, {c['arch']}; {c['devices']} visible)"
    else:
        device = f"not available ({c['reason']})"
    if c["nvrtc_version"]:
        nvrtc = f"{c['nvrtc_version']} ({c['nvrtc_path']})"
    else:
        nvrtc = f"not available ({c['nvrtc_error']})"
    return [
        ("CUDA device", device),
        ("CUDA driver", c["driver_version"] or "not available"),
        ("NVRTC", nvrtc),
        ("kernel cache", c["cache_dir"]),
    ]


def _transformers_row() -> str:
    """The transformers integration: its version and which model families it routes."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return "not installed (bmojo_core.integrations.transformers needs it)"
    from importlib.metadata import version

    from .integrations.transformers import MAMBA1_MODELS, MAMBA2_MODELS

    models = ", ".join(MAMBA1_MODELS + MAMBA2_MODELS)
    return f"{version('transformers')}: integrations.transformers.enable() routes {models}"


def _cmd_info(args: argparse.Namespace) -> int:
    from .runtime.info import machine_info, machine_peak

    info = machine_info()
    peak = machine_peak()
    levels = ", ".join(info["simd_levels"]) or "unknown"
    rows = [
        ("bmojo_core", info["bmojo_core"]),
        ("SIMD level", f"{info['simd_level']} (usable: {levels})"),
        ("bmojo threads", info["bmojo_threads"]),
        ("torch", info["torch"]),
        ("torch threads", f"{info['torch_threads']} (interop {info['torch_interop_threads']})"),
        ("Python", info["python"]),
        ("platform", info["platform"]),
        ("CPU", f"{info['cpu']} ({info['physical_cores']} cores, {info['logical_cpus']} CPUs)"),
        (
            "CPU clock",
            f"{info['cpu_mhz']:.0f} MHz ({info['cpu_mhz_source']})"
            if info["cpu_mhz"]
            else "unknown",
        ),
        (
            "peak fp32",
            f"{peak['peak_gflops']:.1f} GFLOP/s (assumed: {peak['cores']} cores × "
            f"{peak['flops_per_cycle']} flop/cycle)"
            if peak["peak_gflops"]
            else "unknown",
        ),
        ("CUDA usable", "yes" if info["cuda_available"] else "no"),
        *_cuda_rows(),
        ("transformers", _transformers_row()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    from .runtime import set_num_threads, set_simd_level

    try:
        if args.threads is not None:
            set_num_threads(args.threads)
        if args.simd is not None:
            set_simd_level(args.simd)
    except (ValueError, TypeError) as exc:
        print(f"bmojo bench: error: {exc}", file=sys.stderr)
        return 2
    cases = bench.build_cases(args.quick, args.only)
    if not cases:
        print(f"bmojo bench: no case matches --only {' '.join(args.only)}", file=sys.stderr)
        return 2
    if args.list:
        for case in cases:
            print(f"{case.group:<11} {case.name}")
        return 0
    report = bench.run_suite(
        quick=args.quick,
        only=args.only,
        progress=not args.no_progress,
        memory=not args.no_memory,
        with_reference=not args.no_reference,
    )
    print(bench.format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(bench.to_json(report))
        print(f"\nresults written to {args.json}")
    failed = [r.name for r in report["results"] if r.error]
    if failed:
        print(f"\n{len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _short_rows(cfg) -> str:
    tasks, rows = cfg.short_tasks(cfg.num_kv)
    if not tasks:
        return ""
    ns = " ".join(str(t.num_kv) for t in tasks)
    return (
        f"; {cfg.short_frac:.0%} of the steps on {rows} short rows of {cfg.short_len} tokens, "
        f"N in {ns}"
    )


def _cmd_mqar(args: argparse.Namespace) -> int:
    from . import mqar

    kw = {
        k: v
        for k, v in (
            ("models", args.models),
            ("num_kv", args.num_kv),
            ("steps", args.steps),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
            (
                "model_lr",
                args.model_lr
                if args.model_lr is not None
                else (() if args.lr is not None else None),
            ),
            ("ssm_lr", args.ssm_lr),
            ("mixture", False if args.per_n else None),
            ("short_frac", args.short_frac),
            ("short_len", args.short_len),
            ("eidetic_sweep", args.eidetic_sweep),
            (
                "budget_sweep",
                mqar.BUDGET_SCALES if args.budget_sweep is _DEFAULT_SCALES else args.budget_sweep,
            ),
            ("seed", args.seed),
            ("seeds", args.seeds),
            ("schedule", args.schedule),
            ("threads", args.threads),
            ("workers", args.workers),
            ("micro_batches", args.micro_batches),
            ("nproc", args.nproc),
        )
        if v is not None
    }
    try:
        cfg = mqar.ExperimentConfig.quick(**kw) if args.quick else mqar.ExperimentConfig(**kw)
    except (ValueError, TypeError) as exc:
        print(f"bmojo mqar: error: {exc}", file=sys.stderr)
        return 2
    specs = cfg.specs()
    print(
        f"MQAR: V={cfg.vocab}, L={cfg.seq_len}, N in {list(cfg.num_kv)}, "
        f"{'uniform' if cfg.power_a == 1 else f'power_a={cfg.power_a}'} query placement, "
        f"{'random' if cfg.random_fill else 'zero'} fill; {cfg.n_layers} layers, "
        f"d_model {cfg.d_model}, d_state {cfg.d_state}, {cfg.n_heads} heads; {cfg.steps} steps "
        f"of {cfg.batch_size} fresh rows "
        f"({'mixing every N, one training per model' if cfg.mixture else 'one training per N'}"
        + _short_rows(cfg)
        + f"), lr {cfg.lr:g}"
        + "".join(f", {m} {r:g}" for m, r in cfg.model_lr)
        + ("" if cfg.ssm_lr is None else f" (SSM parameters {cfg.ssm_lr:g})")
        + f" ({cfg.schedule}), weight decay {cfg.weight_decay:g}; test set "
        f"{cfg.test_size} rows per N; "
        + (
            f"{cfg.workers} worker(s)"
            if cfg.nproc == 1
            else f"data-parallel on {cfg.nproc} processes"
        )
        + f" x {cfg.threads or 'default'} thread(s)"
        + (f", {cfg.micro_batches} row parts per batch" if cfg.micro_batches > 1 else "")
    )
    if cfg.budget_sweep:
        print(
            f"budget sweep: {', '.join(cfg.models)} at memory scales "
            f"{', '.join(f'{k:g}' for k in cfg.budget_sweep)} of the default models"
        )
    if cfg.eidetic_sweep:
        print(
            f"eidetic sweep: B'MOJO with window {cfg.window}, {cfg.n_fading} fading tokens, "
            f"n_eidetic in {list(cfg.eidetic_sweep)} (0 = B'MOJO-F)"
        )
    for s in specs.values():
        budget = "no attention" if not s.window else f"attention budget {s.attention_budget}"
        print(
            f"  {s.label:<14} window {s.window:>3}, fading {s.n_fading:>2}, "
            f"eidetic {s.n_eidetic:>2}  ({budget})"
        )
    out = args.resume if args.resume is not None else args.out
    progress = not args.no_progress
    results = mqar.run_experiment(
        cfg,
        progress=progress,
        log=None if progress else print,
        record=out,
        resume=args.resume is not None,
    )
    if results["resumed"]:
        print(f"{results['resumed']} training(s) read back from {out}/trainings")
    paths = mqar.save_results(results, out)
    print()
    print(mqar.format_table(results))
    print()
    print(mqar.summarize(results))
    print()
    print(f"total time {results['time_s']:.0f} s; results written to {paths['json']}", end="")
    print(f" and {paths['png']}" if "png" in paths else " (no plot: matplotlib is missing)")
    return 0


def _list_of(kind: type, what: str, example: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type for a comma-separated list of ``kind`` values."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} like {example}, got {text!r}"
            ) from None

    return parse


_int_list = _list_of(int, "integers", "0,4,8,16,32")
_float_list = _list_of(float, "numbers", "0.25,0.5,1,2")


def _model_rate(text: str) -> tuple[str, float]:
    name, sep, rate = text.partition("=")
    try:
        if sep:
            return name, float(rate)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected MODEL=LR like ssm=6e-3, got {text!r}")


# A bare --budget-sweep; not a string, which argparse would pass through _float_list.
_DEFAULT_SCALES = object()


def build_parser() -> argparse.ArgumentParser:
    from .runtime.info import package_version

    parser = argparse.ArgumentParser(
        prog="bmojo", description="bmojo_core: fast, differentiable CPU state-space scans."
    )
    parser.add_argument("--version", action="version", version=f"bmojo_core {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser("info", help="print versions, SIMD level, threads and CUDA status")
    p_info.set_defaults(func=_cmd_info)

    p_bench = sub.add_parser(
        "bench",
        help="run the benchmark suite against the reference",
        description="Run the benchmark suite (selective scan forward and forward+backward vs "
        "bmojo_core.reference, scaling in L, decode step, language-model streaming decode "
        "(fused vs Python step), throughput vs peak; companion scan vs the reference and "
        "scipy.signal.lfilter; causal conv vs torch F.conv1d; bilinear sequential and "
        "parallel paths).",
    )
    p_bench.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    p_bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p_bench.add_argument(
        "--only",
        metavar="NAME",
        action="append",
        help="run only cases whose name contains NAME or whose group is NAME "
        "(scan, scaling, decode, lm_decode, throughput, companion, conv, bilinear, peer); "
        "may be repeated",
    )
    p_bench.add_argument("--threads", type=int, metavar="N", help="bmojo_core threads")
    p_bench.add_argument("--simd", metavar="LEVEL", help="force a SIMD level (see bmojo info)")
    p_bench.add_argument("--list", action="store_true", help="list the cases and exit")
    p_bench.add_argument("--no-reference", action="store_true", help="skip the reference runs")
    p_bench.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory child process"
    )
    p_bench.add_argument("--no-progress", action="store_true", help="no progress display")
    p_bench.set_defaults(func=_cmd_bench)

    p_mqar = sub.add_parser(
        "mqar",
        help="multi-query associative recall: SSM, SWA, B'MOJO-F and B'MOJO at equal budget",
        description="Multi-query associative recall (Zoology's MQAR): trains a 2-layer SSM, "
        "sliding-window attention, B'MOJO-F and B'MOJO at an equal attention budget for each "
        "number N of key-value pairs (fresh data every step), scores them on a fixed seeded "
        "test set and prints the accuracy table and the negative flip rate B'MOJO-F -> "
        "B'MOJO. Default: V=512, L=256, window 32 (+8 fading, +16 eidetic), N in 4 8 16 32, "
        "each model trained once on batches mixing every N (90% of the steps on short rows "
        "of 64 tokens), lr 2e-3 (the pure SSM 6e-3); about 6 minutes on 2 cores. "
        "--eidetic-sweep instead trains B'MOJO at window 32 and 8 fading tokens for each "
        "number of eidetic tokens (0 = B'MOJO-F) and reports accuracy vs n_eidetic per N.",
    )
    p_mqar.add_argument(
        "--quick", action="store_true", help="smoke version (V=128, L=64, N in 2 4; < 1 min)"
    )
    p_mqar.add_argument(
        "--out",
        metavar="DIR",
        default="mqar-results",
        help="directory for results.json, accuracy.png and trainings/ (one file per finished "
        "training; default: mqar-results/)",
    )
    p_mqar.add_argument(
        "--models",
        nargs="+",
        metavar="M",
        help="models to run, among: ssm swa bmojo-f bmojo (default: all)",
    )
    p_mqar.add_argument("--num-kv", nargs="+", type=int, metavar="N", help="values of N")
    p_mqar.add_argument("--steps", type=int, metavar="S", help="training steps per run")
    p_mqar.add_argument("--batch-size", type=int, metavar="B", help="rows per training step")
    p_mqar.add_argument(
        "--lr",
        type=float,
        metavar="LR",
        help="peak learning rate of every model (default 2e-3, the pure SSM 6e-3)",
    )
    p_mqar.add_argument(
        "--model-lr",
        nargs="+",
        type=_model_rate,
        metavar="MODEL=LR",
        help="peak learning rate of some models instead of --lr (e.g. ssm=6e-3)",
    )
    p_mqar.add_argument(
        "--ssm-lr",
        type=float,
        metavar="LR",
        help="peak learning rate of the SSM's parameters in every model (default: the "
        "model's rate)",
    )
    p_mqar.add_argument(
        "--per-n",
        action="store_true",
        help="one training per (model, N) instead of one per model on a mixture of N",
    )
    p_mqar.add_argument(
        "--short-frac",
        type=float,
        metavar="F",
        help="share of the training steps on short rows (default 0.9; 0 = every step on "
        "full-length rows)",
    )
    p_mqar.add_argument(
        "--short-len", type=int, metavar="L", help="length of the short rows (default 64)"
    )
    p_mqar.add_argument(
        "--eidetic-sweep",
        type=_int_list,
        metavar="E,E,...",
        help="B'MOJO with each number of eidetic tokens (e.g. 0,4,8,16,32; 0 = B'MOJO-F) at "
        "the default window and fading tokens, instead of the four models",
    )
    p_mqar.add_argument(
        "--budget-sweep",
        type=_float_list,
        nargs="?",
        const=_DEFAULT_SCALES,
        metavar="K,K,...",
        help="train every model at several memory budgets, multiples K of its default memory "
        "(default 0.25,0.5,1,2); plots accuracy vs memory in floats per N (budget_sweep.png)",
    )
    p_mqar.add_argument("--seed", type=int, metavar="S", help="seed (data, init, test sets)")
    p_mqar.add_argument(
        "--seeds",
        type=int,
        metavar="K",
        help="train everything with K seeds (S, S+1, ...): mean accuracy and seed spread",
    )
    p_mqar.add_argument(
        "--resume",
        metavar="DIR",
        help="write results to DIR and skip the trainings already recorded in DIR/trainings "
        "under the same settings (every run records its trainings there as they finish)",
    )
    p_mqar.add_argument(
        "--schedule", choices=("cosine", "greedy"), help="learning-rate schedule (default cosine)"
    )
    p_mqar.add_argument(
        "--workers",
        type=int,
        metavar="W",
        help="runs trained at a time, each in its own process (default 2; 1 = in-process)",
    )
    p_mqar.add_argument(
        "--threads", type=int, metavar="N", help="torch threads per run (default 1)"
    )
    p_mqar.add_argument(
        "--nproc",
        type=int,
        metavar="P",
        help="train each model data-parallel on P processes (gloo), one training at a time: "
        "the results of --micro-batches P in one process, bit for bit (default 1)",
    )
    p_mqar.add_argument(
        "--micro-batches",
        type=int,
        metavar="K",
        help="compute each batch's gradient over K row parts in turn (default 1)",
    )
    p_mqar.add_argument(
        "--no-progress", action="store_true", help="no progress bars (one line per run instead)"
    )
    p_mqar.set_defaults(func=_cmd_mqar)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
