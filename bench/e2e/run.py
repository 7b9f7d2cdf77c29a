"""End-to-end experiment in the paper's regime: a pretrained student distilled from a stronger teacher.

    .venv/bin/python bench/e2e/run.py                                    # the whole matrix -> docs/results.md
    .venv/bin/python bench/e2e/run.py --starts uniform --seeds 0 --steps 4   # smoke test

Two student starts, both CE-pretrained and saved with ``save_pretrained`` (cached): ``uniform``
(the uniform mixture) and ``skewed`` (``scarce_domains`` seen at ``scarce_share`` the rate of
the others). From each start every method runs at the same token budget with each seed (the
seed sets the data order); every run is ``ddk distill --teacher --student --data`` into
``--runs/<start>/<method>-s<seed>``. A finished run (``summary.json`` of the same config) is
reused and an interrupted one resumes, so the script can simply be started again.

The report (``--report``, default ``docs/results.md``) has, per start: the mean and worst
per-domain gap to the teacher with bootstrap 95% confidence intervals over seeds, the paired
differences DDK - KD and DDK - kd-doremi (bootstrap 95% CI over the seed pairs, win counts), the
per-domain table, diagnostics of DDK's weights, and plots; then ``bench/e2e/findings.md`` (the
reading of these numbers) when it exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk.engine import METHODS
from ddk.recipes.config import STUDENT_STARTS, RecipeConfig, add_config_arguments, config_from_args
from ddk.recipes.demo import demo_config
from ddk.recipes.distill import distill

HERE = Path(__file__).resolve().parent
PAIRS = (("ddk", "kd"), ("ddk", "kd-doremi"), ("ddk", "cpt"), ("kd", "cpt"))
Results = dict[str, dict[str, list[dict[str, Any]]]]  # start -> method -> one summary per seed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", nargs="+", default=["uniform", "skewed"], choices=[s for s in STUDENT_STARTS])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--runs", default="runs/e2e", help="folder of the run folders")
    p.add_argument("--report", default="docs/results.md", help="markdown report (plots go into figures/ next to it)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples of the confidence intervals")
    p.add_argument(
        "--cache-ks", nargs="*", type=int, default=[8, 32, 128], help="teacher-cache k values (none: no cache runs)"
    )
    p.add_argument("--cache-seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of the cache runs")
    add_config_arguments(p)
    return p


def bootstrap_ci(xs: list[float], resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% confidence interval of the mean of ``xs`` (resampling with replacement)."""
    a = np.asarray(xs, dtype=np.float64)
    if a.size < 2:
        return float(a.mean()), float(a.mean())
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    means = a[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _ci(xs: list[float], resamples: int) -> str:
    lo, hi = bootstrap_ci(xs, resamples)
    return f"{statistics.mean(xs):.4f} [{lo:.4f}, {hi:.4f}]" if len(xs) > 1 else f"{xs[0]:.4f}"


def _records(run_dir: str, name: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _run_all(args: argparse.Namespace, argv: list[str]) -> tuple[Results, dict[str, Any]]:
    """Every start x method x seed (cached runs reused); ``(results, models)`` with the model metadata."""
    runs = Path(args.runs)
    results: Results = {}
    models: dict[str, Any] = {}
    for start in args.starts:
        for method in args.methods:
            for seed in args.seeds:
                ns = argparse.Namespace(**{**vars(args), "method": method, "seed": seed, "student_start": start})
                ns.out = str(runs / start / f"{method}-s{seed}")
                cfg = demo_config(config_from_args(ns, base=("experiment",)))  # teacher and students cached
                models.setdefault("teacher", _meta(cfg.teacher))
                models.setdefault("cfg", cfg)
                models.setdefault(f"cfg:{start}", cfg)
                models.setdefault(f"student:{start}", _meta(cfg.student))
                results.setdefault(start, {}).setdefault(method, []).append(_one_run(cfg))
    return results, models


def train_seconds(r: dict[str, Any]) -> float:
    """Seconds from a run's first to its last controller record (Eq. 1 to the last update): the
    training steps and the interval validations, without loading, packing and the teacher's CE.
    Read from ``controller.jsonl``, so it survives a run that was resumed to finish it."""
    recs = _records(r["run_dir"], "controller.jsonl")
    return float(recs[-1]["time"] - recs[0]["time"]) if len(recs) > 1 else float(r["wall_seconds"])


def _meta(folder: str) -> dict[str, Any]:
    return json.loads((Path(folder) / "demo_meta.json").read_text())


def _one_run(cfg: RecipeConfig) -> dict[str, Any]:
    summary_path, cfg_path = cfg.run_dir / "summary.json", cfg.run_dir / "config.json"
    done = summary_path.is_file() and cfg_path.is_file() and json.loads(cfg_path.read_text()) == cfg.to_dict()
    summary = json.loads(summary_path.read_text()) if done else distill(cfg)
    summary["run_dir"] = str(cfg.run_dir)
    return summary


def _cache_runs(args: argparse.Namespace, results: Results, models: dict[str, Any]) -> list[dict[str, Any]]:
    """For each k: ``ddk teacher-cache`` of the teacher (cached), then ``kd`` from the cache per seed
    from the first start's student; ``[{"k", "build_seconds", "bytes_per_position", "runs": [...]}]``."""
    from ddk.recipes.teacher_cache import teacher_cache

    start = args.starts[0]
    if not args.cache_ks or "kd" not in results.get(start, {}):
        return []
    base: RecipeConfig = models[f"cfg:{start}"]
    out = []
    for k in args.cache_ks:
        folder = Path(args.runs) / "cache" / f"k{k}"
        t0 = time.perf_counter()
        cache = teacher_cache(dataclasses.replace(base, student="", out=str(folder), top_k=k, method="kd"))
        seconds_file = folder / "build_seconds.json"
        if not seconds_file.is_file():  # the first build's time; a reused cache keeps it
            seconds_file.write_text(json.dumps(time.perf_counter() - t0))
        positions = sum(cache.manifest["tokens"]["train"]) + sum(cache.manifest["tokens"]["validation"])
        runs = []
        for seed in args.cache_seeds:
            cfg = dataclasses.replace(
                base, method="kd", seed=seed, teacher="", data=(), validation_data=(), teacher_cache=str(folder),
                out=str(Path(args.runs) / start / f"kd-cache-k{k}-s{seed}"),
            )  # fmt: skip
            runs.append(_one_run(cfg))
        out.append(
            {
                "k": k,
                "build_seconds": json.loads(seconds_file.read_text()),
                "bytes_per_position": cache.disk_bytes() / positions,
                "runs": runs,
            }
        )
    return out


def _cache_section(cache: list[dict[str, Any]], results: Results, args: argparse.Namespace) -> list[str]:
    if not cache:
        return []
    start = args.starts[0]
    online = {r["seed"]: r for r in results[start]["kd"]}
    lines = [
        "## Distilling from a teacher cache",
        "",
        f"`ddk teacher-cache` stored the teacher's top-k log-probabilities per position; `kd` then ran from the "
        f"cache (no teacher in memory) from the `{start}` start with seeds {list(args.cache_seeds)}, at the token "
        "budget of the online runs. Quality: the same seed's online full-vocabulary `kd` run is the pair "
        "(negative: the cache run ends closer to the teacher). Training time: from the first to the last "
        "validation pass of a run (its steps and interval validations); the per-step ratio is in "
        "`bench/README.md` (`bench/test_bench_cache.py`).",
        "",
    ]
    rows = []
    for c in cache:
        pairs = [(r, online[r["seed"]]) for r in c["runs"] if r["seed"] in online]
        d_mean = [a["mean_gap"] - b["mean_gap"] for a, b in pairs]
        d_worst = [a["worst_gap"] - b["worst_gap"] for a, b in pairs]
        lo, hi = bootstrap_ci(d_mean, args.bootstrap)
        wall = statistics.mean(train_seconds(b) for _, b in pairs) / statistics.mean(train_seconds(a) for a, _ in pairs)
        rows.append(
            [
                str(c["k"]),
                f"{c['bytes_per_position']:.1f}",
                f"{c['build_seconds']:.0f}",
                f"{statistics.mean(a['mean_gap'] for a, _ in pairs):.4f}",
                f"{statistics.mean(d_mean):+.4f} [{lo:+.4f}, {hi:+.4f}]",
                f"{statistics.mean(d_worst):+.4f}",
                f"{statistics.mean(train_seconds(a) for a, _ in pairs):.0f} s ({wall:.2f}x faster)",
            ]
        )
    on_gap = statistics.mean(online[s]["mean_gap"] for s in args.cache_seeds if s in online)
    on_wall = statistics.mean(train_seconds(online[s]) for s in args.cache_seeds if s in online)
    lines += _table(
        ["k", "bytes per position on disk", "cache build (s)", "mean gap", "mean gap - online kd (95% CI)",
         "worst gap - online kd", "training time"],
        rows,
    )  # fmt: skip
    lines += ["", f"Online full-vocabulary `kd`, same seeds: mean gap {on_gap:.4f}, training time {on_wall:.0f} s.", ""]
    return lines


def _plots(results: Results, fig_dir: Path, resamples: int) -> list[Path]:
    from ddk.recipes.plotting import plot_domain_bars, plot_weights

    out: list[Path] = []
    for start, by_method in results.items():
        names = next(iter(by_method.values()))[0]["domains"]
        gaps = {m: [statistics.mean(r["gap"][i] for r in rs) for i in range(len(names))] for m, rs in by_method.items()}
        errs = {}
        for m, rs in by_method.items():
            cis = [bootstrap_ci([r["gap"][i] for r in rs], resamples) for i in range(len(names))]
            errs[m] = [(hi - lo) / 2 for lo, hi in cis]
        out.append(
            plot_domain_bars(
                gaps,
                names,
                fig_dir / f"e2e_{start}_domain_gaps.png",
                title=f"{start} start: per-domain gap to the teacher (mean over seeds, 95% CI)",
                errors=errs,
            )
        )
        out.append(_gap_curves(by_method, fig_dir / f"e2e_{start}_gap_curves.png", start))
        for m in ("ddk", "kd-doremi"):
            if m in by_method:
                r0 = by_method[m][0]
                out.append(
                    plot_weights(
                        Path(r0["run_dir"]) / "controller.jsonl",
                        fig_dir / f"e2e_{start}_{m}_weights.png",
                        title=f"{start} start: {m} domain weights (seed {r0['seed']})",
                    )
                )
    return out


def _gap_curves(by_method: dict[str, list[dict[str, Any]]], path: Path, start: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for m, rs in by_method.items():
        curves: dict[int, list[float]] = {}
        for r in rs:
            for rec in _records(r["run_dir"], "controller.jsonl"):
                curves.setdefault(rec["step"], []).append(
                    statistics.mean(s - t for s, t in zip(rec["student_ce"], rec["teacher_ce"]))
                )
        steps = sorted(curves)
        ax.plot(steps, [statistics.mean(curves[s]) for s in steps], marker="o", markersize=3, label=m)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean per-domain CE gap (nats/token)")
    ax.set_title(f"{start} start: validation gap to the teacher during distillation (mean over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _paired(by_method: dict[str, list[dict[str, Any]]], a: str, b: str, key: str, resamples: int) -> list[str] | None:
    if a not in by_method or b not in by_method:
        return None
    ra = {r["seed"]: r[key] for r in by_method[a]}
    rb = {r["seed"]: r[key] for r in by_method[b]}
    seeds = sorted(set(ra) & set(rb))
    diffs = [ra[s] - rb[s] for s in seeds]
    lo, hi = bootstrap_ci(diffs, resamples)
    wins = sum(d < 0 for d in diffs)
    return [
        f"{a} - {b}",
        key.replace("_", " "),
        f"{statistics.mean(diffs):+.4f}",
        f"[{lo:+.4f}, {hi:+.4f}]",
        f"{wins} of {len(seeds)}",
        " ".join(f"{d:+.3f}" for d in diffs),
    ]


def _diagnostics(by_method: dict[str, list[dict[str, Any]]], alpha: float) -> list[str]:
    """DDK's mixture: how spread the ratios were, how far the weights moved, and whether they sat at the floor."""
    lines: list[str] = []
    for m in ("ddk", "kd-doremi"):
        if m not in by_method:
            continue
        rows = []
        for r in by_method[m]:
            recs = _records(r["run_dir"], "controller.jsonl")
            if not recs:
                continue
            d = len(recs[0]["weights"])
            floor = (1 - alpha) / d
            ratios = [x for rec in recs for x in rec["ratio"]]
            top = [max(rec["weights"]) for rec in recs]
            at_floor = [sum(w < floor * 1.02 for w in rec["weights"]) for rec in recs[1:]] if m == "ddk" else []
            samples = r["samples_per_domain"]
            share = [c / sum(samples) for c in samples]
            rows.append(
                [
                    str(r["seed"]),
                    f"{min(ratios):.3f} - {max(ratios):.3f}",
                    f"{max(recs[0]['ratio']) / min(recs[0]['ratio']):.3f}",
                    f"{max(recs[0]['weights']):.3f}",
                    f"{statistics.mean(top[1:]) if len(top) > 1 else top[0]:.3f}",
                    f"{statistics.mean(at_floor):.1f} of {d}" if at_floor else "-",
                    f"{min(share):.3f} - {max(share):.3f}",
                ]
            )
        lines += [f"`{m}`: ratios ppl_S/ppl_T seen, the first interval's spread (max/min), weights, samples:", ""]
        lines += _table(
            [
                "seed",
                "ratios seen",
                "r_0 spread max/min",
                "max weight at init",
                "mean max weight after",
                "domains at the floor (mean)" if m == "ddk" else "domains at the floor",
                "sample share min - max",
            ],
            rows,
        )
        lines.append("")
    return lines


def _start_section(
    start: str, by_method: dict[str, list[dict[str, Any]]], models: dict[str, Any], args: argparse.Namespace
) -> list[str]:
    resamples = args.bootstrap
    first = next(iter(by_method.values()))[0]
    names = first["domains"]
    meta = models.get(f"student:{start}", {})
    cfg: RecipeConfig = models["cfg"]
    mixture = meta.get("mixture") or {}
    lines = [f"## Start `{start}`", ""]
    if mixture:
        mix = ", ".join(f"{n} {w:.3f}" for n, w in mixture.items())
        lines += [
            f"The student was CE-pretrained for {cfg.student_pretrain_steps} steps on the mixture {mix} "
            f"({meta.get('train_seconds', 0):.0f} s), then every method continued from that one checkpoint.",
            "",
        ]
    lines += [
        "Gap = student CE - teacher CE on each domain's validation set (nats/token; lower is better); "
        f"mean over {len(args.seeds)} seeds with a bootstrap 95% confidence interval.",
        "",
    ]
    rows = [
        [
            m,
            _ci([r["mean_gap"] for r in rs], resamples),
            _ci([r["worst_gap"] for r in rs], resamples),
            _ci([r["mean_ratio"] for r in rs], resamples),
        ]
        for m, rs in by_method.items()
    ]
    init = _records(first["run_dir"], "controller.jsonl")
    if init:
        g0 = [s - t for s, t in zip(init[0]["student_ce"], init[0]["teacher_ce"])]
        rows.insert(0, ["(start, before distillation)", f"{statistics.mean(g0):.4f}", f"{max(g0):.4f}", "-"])
    lines += _table(["method", "mean gap", "worst-domain gap", "mean ppl ratio"], rows)
    lines += [
        "",
        "Paired differences over seeds (same start, same seed: same data order); negative favours the first:",
        "",
    ]
    prow = [
        row for a, b in PAIRS for key in ("mean_gap", "worst_gap") if (row := _paired(by_method, a, b, key, resamples))
    ]
    lines += _table(["pair", "metric", "mean difference", "95% CI", "first lower on", "per seed"], prow)
    lines += ["", "Per-domain gap (mean over seeds):", ""]
    drows = [
        [m] + [f"{statistics.mean(r['gap'][i] for r in rs):.4f}" for i in range(len(names))]
        for m, rs in by_method.items()
    ]
    if init:
        drows.insert(0, ["(start)"] + [f"{s - t:.4f}" for s, t in zip(init[0]["student_ce"], init[0]["teacher_ce"])])
    drows.append(["teacher CE"] + [f"{c:.4f}" for c in first["teacher_ce"]])
    lines += _table(["method"] + names, drows)
    lines += ["", "Samples drawn per domain (seed " + str(first["seed"]) + "):", ""]
    lines += _table(
        ["method"] + names, [[m] + [str(c) for c in rs[0]["samples_per_domain"]] for m, rs in by_method.items()]
    )
    lines += ["", "Diagnostics of the adaptive mixtures:", ""] + _diagnostics(by_method, cfg.alpha)
    return lines


def _report(
    results: Results,
    models: dict[str, Any],
    args: argparse.Namespace,
    argv: list[str],
    wall: float,
    plots: list[Path],
    report: Path,
) -> str:
    cfg: RecipeConfig = models["cfg"]
    teacher = models["teacher"]
    any_run = next(iter(next(iter(results.values())).values()))[0]
    n_runs = sum(len(rs) for by in results.values() for rs in by.values())
    distill_min = sum(train_seconds(r) for by in results.values() for rs in by.values() for r in rs) / 60
    lines = [
        "# Results: DDK against KD, DoReMi-in-KD and continued pretraining, from pretrained students",
        "",
        f"Generated by `python bench/e2e/run.py {' '.join(argv)}`".rstrip()
        + f" on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({platform.machine()}, {cfg.threads or torch.get_num_threads()} torch thread(s) per run, torch {torch.__version__}, 2 shared CPU cores). "
        f"{n_runs} distillation runs, {distill_min:.1f} min of training (first to last validation pass, summed); this invocation took {wall / 60:.1f} min "
        f"(runs already finished are reused). The teacher trained once in {float(teacher.get('train_seconds', 0)) / 60:.1f} min "
        "and is cached, like the pretrained students.",
        "",
        "## Setup",
        "",
        f"- Corpus: the bundled 8-domain corpus (Debian and PyPI packages), a {cfg.vocab_size}-token BPE tokenizer, "
        f"sequences of {cfg.seq_len} tokens; validation: up to {cfg.val_samples} sequences per domain (capped by the "
        "held-out split).",
        f"- Teacher: {any_run['teacher_params']:,} parameters (Llama-style, {cfg.teacher_layers} layers, hidden "
        f"{cfg.teacher_hidden}), CE-pretrained {cfg.teacher_steps} steps x {cfg.teacher_batch_size} sequences on the "
        f"uniform mixture (final training loss {teacher.get('final_loss', float('nan')):.3f}); its per-domain "
        "validation CE is the `teacher CE` row of each table.",
        f"- Student: {any_run['student_params']:,} parameters ({cfg.student_layers} layers, hidden {cfg.student_hidden}), "
        f"CE-pretrained {cfg.student_pretrain_steps} steps before distillation (seed {cfg.student_seed}); the skewed "
        f"start sees {', '.join(cfg.scarce_domains)} at {cfg.scarce_share:g}x the rate of the other domains.",
        f"- Distillation: every run sees {any_run['tokens']:,} tokens ({cfg.total_steps} steps x {cfg.batch_size} x "
        f"{cfg.seq_len}); AdamW lr {cfg.lr}, {cfg.warmup_steps} warm-up steps, cosine decay; gamma {cfg.gamma}, "
        f"T {cfg.temperature}, alpha {cfg.alpha}, Eq. 1 start (`ddk_init` {cfg.ddk_init}), K = {cfg.interval} steps; "
        f"kd-doremi: eta {cfg.doremi_step_size}, c {cfg.doremi_smoothing}, uniform start. Seeds {list(args.seeds)} set "
        "the data order.",
        "- Methods: `cpt` (CE only), `kd` (uniform mixture), `ddk`, `ddk-no-smoothing`, `ddk-online`, `kd-doremi` "
        "(DoReMi's exponentiated-gradient step on the student's excess CE over the teacher, `ddk.DoReMiScheduler`).",
        "",
    ]
    for start, by_method in results.items():
        lines += _start_section(start, by_method, models, args)
    lines += _cache_section(models.get("cache", []), results, args)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(report.parent).as_posix()})" for p in plots] + [""]
    findings = HERE / "findings.md"
    if findings.is_file():
        lines += [findings.read_text().rstrip(), ""]
    lines += [
        "Run folders (config, metrics.jsonl, controller.jsonl, checkpoints, student, plots): "
        + ", ".join(f"`{Path(args.runs) / s}`" for s in results)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    results, models = _run_all(args, argv)
    models["cache"] = _cache_runs(args, results, models)
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    plots = _plots(results, report.parent / "figures", args.bootstrap)
    text = _report(results, models, args, argv, time.perf_counter() - t0, plots, report)
    report.write_text(text)
    print(text)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
