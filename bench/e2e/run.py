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

from ddk.recipes.config import RecipeConfig, add_config_arguments, config_from_args
from ddk.recipes.demo import demo_config
from ddk.recipes.distill import distill

HERE = Path(__file__).resolve().parent
Results = dict[str, dict[str, list[dict[str, Any]]]]  # start -> variant -> one summary per seed

# The student starts: overrides of the experiment preset. ``extreme``: german (a language the other
# domains barely share) nearly unseen in the student's pretraining, so that Eq. 1 concentrates.
STARTS: dict[str, dict[str, Any]] = {
    "uniform": {"student_start": "uniform"},
    "skewed": {"student_start": "skewed"},
    "extreme": {"student_start": "skewed", "scarce_domains": ("german",), "scarce_share": 0.02},
}
# The variants: a method plus options. The DDK candidates change one option of ``--method ddk``.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "cpt": ("cpt", {}),
    "kd": ("kd", {}),
    "kd-doremi": ("kd-doremi", {}),
    "ddk": ("ddk", {}),
    "ddk-floored": ("ddk", {"ddk_init": "floored"}),
    "ddk-uniform-init": ("ddk", {"ddk_init": "uniform"}),
    "ddk-log-ratio": ("ddk", {"ddk_signal": "log_ratio"}),
    "ddk-gain": ("ddk", {"ddk_signal": "gain"}),
    "ddk-tempered": ("ddk", {"ddk_temperature": 4.0}),
    "ddk-alpha-0.2": ("ddk", {"alpha": 0.2}),
    "ddk-no-smoothing": ("ddk-no-smoothing", {}),
    "ddk-online": ("ddk-online", {}),
}
DEFAULT_VARIANTS = (
    "cpt",
    "kd",
    "kd-doremi",
    "ddk",
    "ddk-floored",
    "ddk-uniform-init",
    "ddk-log-ratio",
    "ddk-gain",
    "ddk-tempered",
    "ddk-alpha-0.2",
)
CANDIDATES = tuple(v for v in VARIANTS if v.startswith("ddk-") and VARIANTS[v][0] == "ddk")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", nargs="+", default=["extreme", "skewed", "uniform"], choices=list(STARTS))
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--shard", default="0/1", help="I/N: run only every N-th run from the I-th (run N of them side by side)"
    )
    p.add_argument("--no-report", action="store_true", help="run (this shard's runs) without writing the report")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--runs", default="runs/e2e", help="folder of the run folders")
    p.add_argument("--report", default="docs/results.md", help="markdown report (plots go into figures/ next to it)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples of the confidence intervals")
    p.add_argument(
        "--cache-ks",
        nargs="*",
        type=int,
        default=[],
        help="teacher-cache k values, e.g. 8 32 128 (none: no cache runs)",
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


def _config(args: argparse.Namespace, start: str, variant: str, seed: int) -> RecipeConfig:
    """The run's config: the experiment preset, the start's and the variant's overrides."""
    method, options = VARIANTS[variant]
    ns = argparse.Namespace(**{**vars(args), "method": method, "seed": seed, **STARTS[start], **options})
    ns.out = str(Path(args.runs) / start / f"{variant}-s{seed}")
    return config_from_args(ns, base=("experiment",))


def _run_all(args: argparse.Namespace, argv: list[str]) -> tuple[Results, dict[str, Any]]:
    """Every start x variant x seed (cached runs reused; with ``--shard I/N`` only this shard's);
    ``(results, models)`` with the model metadata and the start's test-split gaps."""
    shard, n_shards = (int(x) for x in args.shard.split("/"))
    results: Results = {}
    models: dict[str, Any] = {}
    k = 0
    for start in args.starts:
        for seed in args.seeds:
            for variant in args.methods:
                k += 1
                if (k - 1) % n_shards != shard:
                    continue
                cfg = demo_config(_config(args, start, variant, seed))  # teacher and students cached
                models.setdefault("teacher", _meta(cfg.teacher))
                models.setdefault("cfg", cfg)
                models.setdefault(f"cfg:{start}", cfg)
                models.setdefault(f"student:{start}", _meta(cfg.student))
                results.setdefault(start, {}).setdefault(variant, []).append(_one_run(cfg))
    if not args.no_report:
        for start in results:
            models[f"start_test:{start}"] = start_test_gaps(models[f"cfg:{start}"])
    return results, models


def start_test_gaps(cfg: RecipeConfig) -> dict[str, Any]:
    """The start student's per-domain CE and gap on the test split, and Eq. 1's weights from its
    validation ratios (cached in the student's folder: ``test_start.json``)."""
    from ddk.engine.components import build_components, load_run_data, load_test_data, report_test_split
    from ddk.engine.models import load_models
    from ddk.schedule import FactorSmoother

    path = Path(cfg.run_dir).parent / f"start-{Path(cfg.student).name}.json"
    if path.is_file():
        return dict(json.loads(path.read_text()))
    cfg = dataclasses.replace(cfg, progress=False).validate()
    device = torch.device("cpu")
    teacher, student, tokenizer = load_models(cfg, device)
    data = load_run_data(cfg, tokenizer)
    parts = build_components(cfg, data, global_batch_size=cfg.batch_size, seed=0, eval_batch_size=cfg.eval_batch_size)
    parts.ensure_teacher_ce(teacher, student)
    disc = parts.estimator.estimate(student)
    report = report_test_split(
        parts, load_test_data(cfg, tokenizer, data.names), student, teacher, eval_batch_size=cfg.eval_batch_size
    )
    report.update(
        domains=list(data.names),
        validation_gap=disc.gap.tolist(),
        validation_ratio=disc.ratio.tolist(),
        eq1_weights=FactorSmoother(len(data.names)).initialize(disc).tolist(),
    )
    path.write_text(json.dumps(report, indent=2))
    return report


def train_seconds(r: dict[str, Any]) -> float:
    """Seconds from a run's first to its last controller record (Eq. 1 to the last update): the
    training steps and the interval validations, without loading, packing and the teacher's CE.
    Read from ``controller.jsonl``, so it survives a run that was resumed to finish it."""
    recs = _records(r["run_dir"], "controller.jsonl")
    return float(recs[-1]["time"] - recs[0]["time"]) if len(recs) > 1 else float(r["wall_seconds"])


def _meta(folder: str) -> dict[str, Any]:
    return json.loads((Path(folder) / "demo_meta.json").read_text())


def _same_config(saved: dict[str, Any], cfg: RecipeConfig) -> bool:
    """``saved`` (a run's ``config.json``) is ``cfg``; options added to the library since the run
    count as equal when ``cfg`` has their default."""
    defaults = RecipeConfig().to_dict()
    return {**defaults, **saved} == cfg.to_dict()


def _one_run(cfg: RecipeConfig) -> dict[str, Any]:
    summary_path, cfg_path = cfg.run_dir / "summary.json", cfg.run_dir / "config.json"
    done = summary_path.is_file() and cfg_path.is_file() and _same_config(json.loads(cfg_path.read_text()), cfg)
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
                base, method="kd", seed=seed, teacher="", data=(), validation_data=(), test_data=(),
                teacher_cache=str(folder),
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


def _test(r: dict[str, Any], key: str) -> Any:
    """A run's figure on the test split (``summary["test"][key]``)."""
    return r["test"][key]


def _plots(results: Results, fig_dir: Path, resamples: int) -> list[Path]:
    from ddk.recipes.plotting import plot_domain_bars

    out: list[Path] = []
    for start, by_method in results.items():
        names = next(iter(by_method.values()))[0]["domains"]
        gaps = {
            m: [statistics.mean(_test(r, "gap")[i] for r in rs) for i in range(len(names))]
            for m, rs in by_method.items()
        }
        errs = {}
        for m, rs in by_method.items():
            cis = [bootstrap_ci([_test(r, "gap")[i] for r in rs], resamples) for i in range(len(names))]
            errs[m] = [(hi - lo) / 2 for lo, hi in cis]
        out.append(
            plot_domain_bars(
                gaps,
                names,
                fig_dir / f"e2e_{start}_domain_gaps.png",
                title=f"{start} start: per-domain gap to the teacher on the test split (mean over seeds, 95% CI)",
                errors=errs,
            )
        )
        out.append(_weight_panels(by_method, fig_dir / f"e2e_{start}_weights.png", start))
        out.append(_domain_gap_panels(by_method, fig_dir / f"e2e_{start}_gap_curves.png", start))
    return out


def _adaptive(by_method: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [m for m in by_method if VARIANTS[m][0] in ("ddk", "kd-doremi", "ddk-no-smoothing", "ddk-online")]


def _figure(n: int) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _weight_panels(by_method: dict[str, list[dict[str, Any]]], path: Path, start: str) -> Path:
    """One panel per adaptive variant: each domain's weight at every update (seed of the first run)."""
    methods = _adaptive(by_method)
    fig, axes = _figure(max(len(methods), 1))
    for ax, m in zip(axes, methods):
        r0 = by_method[m][0]
        recs = _records(r0["run_dir"], "controller.jsonl")
        if not recs:
            continue
        steps = [rec["step"] for rec in recs]
        for i, name in enumerate(recs[0]["domain_names"]):
            ax.step(steps, [rec["weights"][i] for rec in recs], where="post", label=name)
        ax.set_title(f"{m} (seed {r0['seed']})", fontsize="small")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
    if methods:
        axes[0].legend(fontsize="x-small")
        axes[0].set_ylabel("domain weight")
    fig.suptitle(f"{start} start: domain weights at each update")
    return _save(fig, path)


def _domain_gap_panels(by_method: dict[str, list[dict[str, Any]]], path: Path, start: str) -> Path:
    """One panel per domain: its validation gap at every update, mean over seeds, one line per variant."""
    names = next(iter(by_method.values()))[0]["domains"]
    fig, axes = _figure(len(names))
    for i, (ax, name) in enumerate(zip(axes, names)):
        for m, rs in by_method.items():
            curves: dict[int, list[float]] = {}
            for r in rs:
                for rec in _records(r["run_dir"], "controller.jsonl"):
                    curves.setdefault(rec["step"], []).append(rec["student_ce"][i] - rec["teacher_ce"][i])
            steps = sorted(curves)
            ax.plot(steps, [statistics.mean(curves[t]) for t in steps], marker=".", markersize=3, label=m)
        ax.set_title(name, fontsize="small")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("validation gap (nats/token)")
    axes[0].legend(fontsize="xx-small")
    fig.suptitle(f"{start} start: per-domain validation gap during distillation (mean over seeds)")
    return _save(fig, path)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def paired(by_method: dict[str, list[dict[str, Any]]], a: str, b: str, key: str, resamples: int) -> dict[str, Any]:
    """Paired difference ``a - b`` of the test split's ``key`` over the common seeds: mean, bootstrap
    95% CI, the seeds where ``a`` is lower, and the per-seed differences."""
    ra = {r["seed"]: _test(r, key) for r in by_method[a]}
    rb = {r["seed"]: _test(r, key) for r in by_method[b]}
    seeds = sorted(set(ra) & set(rb))
    diffs = [ra[s] - rb[s] for s in seeds]
    lo, hi = bootstrap_ci(diffs, resamples)
    return {
        "mean": statistics.mean(diffs),
        "ci": (lo, hi),
        "wins": sum(d < 0 for d in diffs),
        "n": len(seeds),
        "diffs": diffs,
    }


def _paired_row(by_method: dict[str, list[dict[str, Any]]], a: str, b: str, key: str, resamples: int) -> list[str]:
    p = paired(by_method, a, b, key, resamples)
    lo, hi = p["ci"]
    return [
        f"{a} - {b}",
        key.replace("_", " "),
        f"{p['mean']:+.4f}",
        f"[{lo:+.4f}, {hi:+.4f}]",
        f"{p['wins']} of {p['n']}",
        " ".join(f"{d:+.3f}" for d in p["diffs"]),
    ]


def _diagnostics(by_method: dict[str, list[dict[str, Any]]], alpha: float) -> list[str]:
    """Each adaptive variant's mixture: the ratios it saw, r_0, how concentrated the weights were,
    whether they sat at the floor, and the share of samples each domain got (mean over seeds)."""
    rows = []
    for m in _adaptive(by_method):
        tops0, tops, floors, ratios, shares = [], [], [], [], []
        for r in by_method[m]:
            recs = _records(r["run_dir"], "controller.jsonl")
            if not recs:
                continue
            d = len(recs[0]["weights"])
            a = VARIANTS[m][1].get("alpha", alpha)
            floor = (1 - a) / d
            ratios += [x for rec in recs for x in rec["ratio"]]
            tops0.append(max(recs[0]["weights"]))
            tops += [max(rec["weights"]) for rec in recs[1:]]
            floors += [sum(w < floor * 1.02 for w in rec["weights"]) for rec in recs[1:]]
            samples = r["samples_per_domain"]
            shares.append([c / sum(samples) for c in samples])
        if not tops0:
            continue
        mean_share = [statistics.mean(col) for col in zip(*shares)]
        rows.append(
            [
                m,
                f"{min(ratios):.2f} - {max(ratios):.2f}",
                f"{statistics.mean(tops0):.3f}",
                f"{statistics.mean(tops):.3f}" if tops else "-",
                f"{statistics.mean(floors):.1f}" if floors and VARIANTS[m][0] != "kd-doremi" else "-",
                f"{min(mean_share):.3f} - {max(mean_share):.3f}",
            ]
        )
    return _table(
        [
            "variant",
            "ratios seen",
            "max weight of r_0",
            "mean max weight after",
            "domains at the floor",
            "sample share min - max",
        ],
        rows,
    )


def _start_section(
    start: str, by_method: dict[str, list[dict[str, Any]]], models: dict[str, Any], args: argparse.Namespace
) -> list[str]:
    resamples = args.bootstrap
    first = next(iter(by_method.values()))[0]
    names = first["domains"]
    meta = models.get(f"student:{start}", {})
    cfg: RecipeConfig = models[f"cfg:{start}"]
    st0 = models.get(f"start_test:{start}")
    mixture = meta.get("mixture") or {}
    lines = [f"## Start `{start}`", ""]
    if mixture:
        mix = ", ".join(f"{n} {w:.3f}" for n, w in mixture.items())
        lines += [
            f"The student was CE-pretrained for {cfg.student_pretrain_steps} steps on the mixture {mix} "
            f"({meta.get('train_seconds', 0):.0f} s), then every variant continued from that one checkpoint.",
            "",
        ]
    if st0:
        top = max(range(len(names)), key=lambda i: st0["eq1_weights"][i])
        lines += [
            f"Before distillation: test gaps {', '.join(f'{n} {g:.2f}' for n, g in zip(names, st0['gap']))} "
            f"(validation: {', '.join(f'{g:.2f}' for g in st0['validation_gap'])}); validation ratios "
            f"ppl_S/ppl_T {min(st0['validation_ratio']):.2f} to {max(st0['validation_ratio']):.2f}; the paper's "
            f"Eq. 1 puts {st0['eq1_weights'][top]:.5f} of the first interval on {names[top]}.",
            "",
        ]
    lines += [
        "Gap = student CE - teacher CE per domain (nats/token; lower is better), mean and worst over domains; "
        f"mean over {len(args.seeds)} seeds with a bootstrap 95% confidence interval. **Test** is the held-out "
        "split no method reads; *validation* is the split the adaptive variants steer by (the yardstick of "
        "the previous version of this page), beside it.",
        "",
    ]
    rows = []
    if st0:
        rows.append(
            ["(start)", f"{statistics.mean(st0['gap']):.4f}", f"{max(st0['gap']):.4f}",
             f"{statistics.mean(st0['validation_gap']):.4f}", f"{max(st0['validation_gap']):.4f}"]
        )  # fmt: skip
    for m, rs in by_method.items():
        rows.append(
            [
                m,
                _ci([_test(r, "mean_gap") for r in rs], resamples),
                _ci([_test(r, "worst_gap") for r in rs], resamples),
                f"{statistics.mean(r['mean_gap'] for r in rs):.4f}",
                f"{statistics.mean(r['worst_gap'] for r in rs):.4f}",
            ]
        )
    lines += _table(["variant", "**test** mean gap", "**test** worst gap", "validation mean", "validation worst"], rows)
    lines += [
        "",
        "Paired differences on the test split over seeds (same seed: same data order); negative favours the first:",
        "",
    ]
    prow = []
    for base in ("kd", "ddk"):
        for m in by_method:
            if m in (base, "cpt") or base not in by_method or (base == "ddk" and m in ("kd", "kd-doremi")):
                continue
            prow += [_paired_row(by_method, m, base, key, resamples) for key in ("mean_gap", "worst_gap")]
    lines += _table(["pair", "metric", "mean difference", "95% CI", "first lower on", "per seed"], prow)
    lines += ["", "Per-domain test gap (mean over seeds):", ""]
    drows = [
        [m] + [f"{statistics.mean(_test(r, 'gap')[i] for r in rs):.3f}" for i in range(len(names))]
        for m, rs in by_method.items()
    ]
    if st0:
        drows.insert(0, ["(start)"] + [f"{g:.3f}" for g in st0["gap"]])
    drows.append(["teacher CE (test)"] + [f"{c:.3f}" for c in _test(first, "teacher_ce")])
    lines += _table(["variant"] + names, drows)
    lines += ["", "Samples drawn per domain (mean over seeds):", ""]
    lines += _table(
        ["variant"] + names,
        [[m] + [f"{statistics.mean(r['samples_per_domain'][i] for r in rs):.0f}" for i in range(len(names))]
         for m, rs in by_method.items()],
    )  # fmt: skip
    lines += ["", "The adaptive mixtures:", ""] + _diagnostics(by_method, cfg.alpha) + [""]
    return lines


def default_rule(results: Results, resamples: int) -> dict[str, dict[str, Any]]:
    """Per candidate: in every start, does it beat ``kd`` on the test split's mean and worst gap with
    the 95% CI below 0, and how does it compare with ``ddk`` (paper)? ``{variant: {start: {...}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for m in ("ddk", *CANDIDATES):
        for start, by_method in results.items():
            if m not in by_method or "kd" not in by_method:
                continue
            row = {k: paired(by_method, m, "kd", k, resamples) for k in ("mean_gap", "worst_gap")}
            if m != "ddk" and "ddk" in by_method:
                row.update(
                    {f"{k} vs ddk": paired(by_method, m, "ddk", k, resamples) for k in ("mean_gap", "worst_gap")}
                )
            out.setdefault(m, {})[start] = row
    return out


def _rule_section(results: Results, resamples: int) -> list[str]:
    rule = default_rule(results, resamples)
    starts = list(results)
    lines = [
        "## Which variant is the default",
        "",
        "The rule: a variant replaces the paper's form as `--method ddk`'s default only if it beats `kd` on both "
        "the mean and the worst-domain test gap in every start, with both 95% CIs below 0. Each cell: the "
        "variant's paired difference to `kd` on the test split, mean gap / worst gap (a check mark where the CI "
        "is below 0).",
        "",
    ]

    def cell(p: dict[str, Any]) -> str:
        return f"{p['mean']:+.4f}{' ✓' if p['ci'][1] < 0 else ''}"

    rows = []
    for m, by_start in rule.items():
        ok = all(s in by_start and all(by_start[s][k]["ci"][1] < 0 for k in ("mean_gap", "worst_gap")) for s in starts)
        rows.append(
            [m]
            + [
                f"{cell(by_start[s]['mean_gap'])} / {cell(by_start[s]['worst_gap'])}" if s in by_start else "-"
                for s in starts
            ]
            + ["yes" if ok else "no"]
        )
    lines += _table(["variant"] + [f"`{s}`: mean / worst" for s in starts] + ["meets the rule"], rows)
    return lines + [""]


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
    extreme = STARTS["extreme"]
    skewed = models.get("cfg:skewed", cfg)
    lines = [
        "# Results: DDK and its variants against KD from three student starts, on a held-out test split",
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
        f"sequences of {cfg.seq_len} tokens. Three sides per domain by a stable hash of each unit (file, entry, "
        f"chapter): train, validation ({cfg.validation_fraction:g} of the units; up to {cfg.val_samples} sequences, "
        f"read by the adaptive variants to set the weights) and test ({cfg.test_fraction:g}; up to "
        f"{cfg.val_samples} sequences, read by no method: every gap below is on it unless marked validation).",
        f"- Teacher: {any_run['teacher_params']:,} parameters (Llama-style, {cfg.teacher_layers} layers, hidden "
        f"{cfg.teacher_hidden}), CE-pretrained {cfg.teacher_steps} steps x {cfg.teacher_batch_size} sequences on the "
        f"uniform mixture (final training loss {teacher.get('final_loss', float('nan')):.3f}).",
        f"- Students: {any_run['student_params']:,} parameters ({cfg.student_layers} layers, hidden {cfg.student_hidden}), "
        f"CE-pretrained {cfg.student_pretrain_steps} steps (seed {cfg.student_seed}) on one of three mixtures: "
        f"`uniform`; `skewed` ({', '.join(skewed.scarce_domains)} at {skewed.scarce_share:g}x the rate of the "
        f"others); `extreme` ({', '.join(extreme['scarce_domains'])} at {extreme['scarce_share']:g}x: nearly unseen).",
        f"- Distillation: every run sees {any_run['tokens']:,} tokens ({cfg.total_steps} steps x {cfg.batch_size} x "
        f"{cfg.seq_len}); AdamW lr {cfg.lr}, {cfg.warmup_steps} warm-up steps, cosine decay; gamma {cfg.gamma}, "
        f"T {cfg.temperature}, alpha {cfg.alpha}, K = {cfg.interval} steps; kd-doremi: eta {cfg.doremi_step_size}, "
        f"c {cfg.doremi_smoothing}, uniform start. Seeds {list(args.seeds)} set the data order.",
        "- Variants: `cpt` (CE only), `kd` (uniform mixture), `kd-doremi` (DoReMi's exponentiated-gradient step "
        "inside KD), `ddk` (the paper: Eq. 1, then Eq. 2), and the candidates, each `--method ddk` with one option: "
        + ", ".join(
            f"`{v}` ({', '.join(f'{k}={o}' for k, o in VARIANTS[v][1].items())})"
            for v in args.methods
            if v in CANDIDATES
        )
        + ". What the options compute: `ddk.FactorSmoother`'s docstring and `docs/guides/method.md`.",
        "",
    ]
    if all(s in results for s in STARTS):
        lines += _rule_section(results, args.bootstrap)
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
    if args.no_report:
        return 0
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
