"""The ``ddk`` command."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the commands import the heavy modules lazily
    from ddk.recipes.config import RecipeConfig


def _cmd_demo(args: argparse.Namespace) -> int:
    from ddk.recipes.synthetic import SyntheticConfig, run

    cfg = SyntheticConfig(student_steps=args.steps, seed=args.seed)
    run(cfg, out_dir=args.out, progress=not args.quiet)
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    from ddk_kernels.dispatch import backend_report

    for device in ["cpu"] + (["cuda"] if _cuda() else []):
        print(backend_report(device))
    return 0


def _cmd_data_build(args: argparse.Namespace) -> int:
    import json

    from ddk.recipes.corpus import CorpusConfig, build_corpus
    from ddk.recipes.sources import DOMAINS

    domains = tuple(args.domains) if args.domains else tuple(DOMAINS)
    if args.no_builtin:
        domains = ()
    folders = dict(args.user_folder or {})
    cfg = CorpusConfig(
        domains=domains,
        user_folders=folders,
        user_jsonl=tuple(args.user_jsonl or ()),
        max_chars=args.max_chars if args.max_chars > 0 else None,
        validation_fraction=args.validation_fraction,
        record_chars=args.record_chars,
        seed=args.seed,
        cache_dir=args.cache_dir,
        offline=args.offline,
        skip_bad_lines=args.skip_bad_lines,
    )
    man = build_corpus(args.out, cfg, force=args.force)
    print(
        json.dumps(
            {
                "out": args.out,
                "domains": {k: {s: v[s]["chars"] for s in ("train", "validation")} for k, v in man["domains"].items()},
                "skipped": man["skipped"],
                "skipped_lines": man.get("skipped_lines", {}),
            },
            indent=2,
        )
    )
    return 0


def _recipe_config(args: argparse.Namespace, base: tuple[str, ...] = ()) -> RecipeConfig:
    from ddk.recipes.config import config_from_args

    cfg = config_from_args(args, base, command=args.command)
    _third_party_bars(cfg.progress)
    return cfg


def _third_party_bars(progress: bool) -> None:
    """No tqdm bars of transformers and huggingface_hub (loading and writing weights) where ddk
    draws none (``ddk.engine.progress.show_bars``): a log file gets no ``\\r`` lines."""
    import os

    from ddk.engine.progress import show_bars

    if show_bars(progress):
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _cmd_teacher(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ddk.distributed import init_from_env, rank_world
    from ddk.recipes.demo import demo_config

    cfg = _recipe_config(args)
    created = init_from_env(cfg.process_group_backend)  # under torchrun: rank 0 trains, the others wait and load
    try:
        cfg = demo_config(cfg)
        if rank_world()[0] == 0:
            import shlex

            print(f"teacher: {cfg.teacher}\nstudent: {cfg.student}\ntokenizer: {cfg.tokenizer}")
            command = ["ddk", "distill", "--teacher", cfg.teacher, "--student", cfg.student, "--tokenizer"]
            command += [cfg.tokenizer, "--data", *cfg.data, "--validation-data", *cfg.validation_data]
            command += (["--test-data", *cfg.test_data] if cfg.test_data else []) + ["--seq-len", str(cfg.seq_len)]
            print(f"distill them: {shlex.join(command)}")
    finally:
        if created:
            dist.destroy_process_group()
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from ddk.recipes.distill import distill

    cfg = _recipe_config(args)
    if cfg.uses_demo:  # no --student/--data: the bundled demo's teacher, student and corpus
        from ddk.recipes.demo import run_demo

        run_demo(cfg)
    else:
        distill(cfg)
    return 0


def _cmd_teacher_cache(args: argparse.Namespace) -> int:
    from ddk.recipes.teacher_cache import teacher_cache

    teacher_cache(_recipe_config(args))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ddk.recipes.distill import evaluate

    _third_party_bars(True)  # as distill: no loading bars of transformers where stderr is no terminal
    evaluate(args.run)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ddk.recipes.report import compare_runs

    comp = compare_runs(args.runs, None if args.no_plot else args.plot)
    print(comp.text)
    if comp.plot is not None:
        print(f"plot: {comp.plot}")
    return 0


def _cmd_demo_real(args: argparse.Namespace) -> int:
    from ddk.recipes.demo import compare_demo

    compare_demo(_recipe_config(args, base=("demo",)), preset="+".join(["demo", *args.config]))
    return 0


_OWN_MODELS_HELP = """

Your own models: `ddk distill --teacher T --student S --data my.jsonl --out run` distills the saved
causal LM T into S on records with a domain and a text field (--domain-field, --text-field), or on
one file per domain (`--data code=code.jsonl prose=prose.parquet`), and writes run/student
(save_pretrained + tokenizer). Without --student it runs the bundled demo at its default sizes
(`ddk teacher` and `ddk demo-real` take the demo's options). Without a terminal on stderr (a log
file), and with --no-progress, it prints a plain line every --log-every steps instead of a bar."""

_DISTRIBUTED_HELP = """

Many processes: `torchrun --nproc_per_node=R -m ddk.recipes.cli distill ...` trains with DDP (gloo on the
CPU, NCCL with one GPU per rank on CUDA; --dist-backend), or with --fsdp shards the student with
FSDP2. --batch-size is the global batch (a multiple of R): each rank trains on its slice of the
same global batch and the result matches one process with the same --batch-size up to float
summation order. Only rank 0 writes the run folder; --debug-checks (or DDK_DEBUG=1) checks at
each DDK interval that every rank holds the same domain weights and student parameters.
Checkpoints: checkpoint-<step>/ (safetensors + JSON, SHA-256 manifest) every --checkpoint-every
steps, the newest --keep-checkpoints kept; --resume (the default) continues from the newest valid
one (a torn or corrupted one is passed over with a warning); --no-resume moves the old run's files
into replaced-<time>/. One `ddk distill` per --out at a time (an advisory lock).
Preemption: SIGTERM or SIGINT (Ctrl-C) finish the current step, write a checkpoint and exit with
status 75; rerun the same command to resume (a second signal stops at once)."""


_USAGE = {
    "distill": "ddk distill --teacher T --student S --data FILE|NAME=FILE [...] [--out RUN] [options]\n"
    "       ddk distill --student S --teacher-cache DIR [--out RUN] [options]\n"
    "       ddk distill [options]  (no --student: the bundled demo)",
    "teacher-cache": "ddk teacher-cache --teacher T --data FILE|NAME=FILE [...] --out DIR [--top-k K] [options]",
    "teacher": "ddk teacher [options]",
    "demo-real": "ddk demo-real [options]",
}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddk", description="Domain-aware knowledge distillation (DDK).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="distill a student with KD and DDK on synthetic domains and compare")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=300, help="student optimizer steps per method")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)
    backends = sub.add_parser("backends", help="list the KD loss backends and why any cannot run")
    backends.set_defaults(func=_cmd_backends)

    from ddk.recipes.config import _KeyValue, add_config_arguments

    data = sub.add_parser("data", help="build the real multi-domain corpus")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="collect the domains into per-domain train/validation JSONL + manifest")
    build.add_argument("--out", default="data/corpus", help="corpus folder (default: data/corpus)")
    build.add_argument("--domains", nargs="+", help="built-in domains to collect (default: all eight)")
    build.add_argument("--no-builtin", action="store_true", help="only the user domains")
    build.add_argument(
        "--user-folder", nargs="+", action=_KeyValue, metavar="NAME=DIR", help="extra domain from a folder of files"
    )
    build.add_argument("--user-jsonl", nargs="+", metavar="FILE", help="JSONL files with 'domain' and 'text' fields")
    build.add_argument("--max-chars", type=int, default=2_000_000, help="per-domain cap in characters (0: none)")
    build.add_argument("--validation-fraction", type=float, default=0.05)
    build.add_argument(
        "--record-chars", type=int, default=4000, help="longest record; longer units are cut at line breaks"
    )
    build.add_argument("--seed", type=int, default=0, help="seed of the split hash")
    build.add_argument("--cache-dir", default=None, help="package cache (default: ~/.cache/ddk/debs)")
    build.add_argument("--offline", action="store_true", help="use only packages already in the cache")
    build.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")
    build.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip corrupted lines of --user-jsonl files (reported with file and line, counted in the "
        "manifest's skipped_lines) instead of failing",
    )
    build.set_defaults(func=_cmd_data_build)

    for name, func, text in (
        ("teacher", _cmd_teacher, "build (or find cached) the demo corpus, tokenizer, pretrained teacher and student"),
        (
            "distill",
            _cmd_distill,
            "distill --teacher into --student on --data (or from --teacher-cache): --method "
            "cpt|kd|ddk|ddk-no-smoothing|ddk-online|kd-doremi",
        ),
        (
            "teacher-cache",
            _cmd_teacher_cache,
            "run --teacher once over --data and store its top-k log-probabilities per position in --out "
            "(--top-k; resumable); then `ddk distill --student S --teacher-cache DIR` needs no teacher",
        ),
        (
            "demo-real",
            _cmd_demo_real,
            "corpus + tokenizer + teacher + pretrained student, then KD and DDK side by side (preset 'demo')",
        ),
    ):
        p = sub.add_parser(
            name,
            help=text,
            usage=_USAGE[name],
            description=text
            + (_OWN_MODELS_HELP if name == "distill" else "")
            + (_DISTRIBUTED_HELP if name != "teacher" else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_config_arguments(p, command=name)  # its options in groups; another command's flag names that command
        p.set_defaults(func=func)
    ev = sub.add_parser("evaluate", help="per-domain validation CE of a run's student and its teacher")
    ev.add_argument("run", help="a distill run folder")
    ev.set_defaults(func=_cmd_evaluate)
    cmp_ = sub.add_parser(
        "compare",
        help="the per-domain gaps of finished runs side by side, against the first, and their bar plot",
        description="Print the per-domain validation gap (student CE - teacher CE, nats/token) of each finished "
        "run folder (its summary.json), with mean and worst, a '<run> - <first>' row per other run, and the "
        "test gaps when every run has them (--test-data); write the gaps side by side to --plot.",
    )
    cmp_.add_argument("runs", nargs="+", metavar="RUN", help="run folders of ddk distill; the first is the reference")
    cmp_.add_argument("--plot", default="compare.png", help="bar plot of the final gaps (default: compare.png)")
    cmp_.add_argument("--no-plot", action="store_true", help="print the table only")
    cmp_.set_defaults(func=_cmd_compare)
    return parser


_EXIT_PREEMPTED = 75  # ddk.engine.preempt.EXIT_PREEMPTED, without importing torch first


def _stopped_early(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT before a command has installed its own handlers (while torch and the models'
    libraries are imported): nothing is written yet, so stop with the preemption status."""
    print(
        f"ddk: stopped by {signal.Signals(signum).name} during start-up (nothing written); rerun the same command.",
        file=sys.stderr,
    )
    raise SystemExit(_EXIT_PREEMPTED)


def main(argv: list[str] | None = None) -> int:
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    signals = (signal.SIGTERM, signal.SIGINT) if main_thread else ()
    previous = {s: signal.signal(s, _stopped_early) for s in signals}  # before torch is imported
    try:
        return _main(argv)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv: list[str] | None) -> int:
    from ddk.engine.preempt import EXIT_PREEMPTED, Preempted, first_rank

    args = build_parser().parse_args(argv)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_: f"ddk {args.command}: warning: {message}\n"  # no source line
    try:
        return int(args.func(args))
    except ValueError as e:  # bad options or inputs: the message says what to fix (in flags, where it has them)
        print(f"ddk {args.command}: error: {getattr(e, 'cli_message', e)}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM/SIGINT: the checkpoint is written; the same command resumes
        if first_rank():  # every rank stops with 75; rank 0 says it once
            print(f"ddk {args.command}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
