"""The ``ddk`` command."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from ddk.recipes.synthetic import SyntheticConfig, run

    cfg = SyntheticConfig(student_steps=args.steps, seed=args.seed)
    run(cfg, out_dir=args.out, progress=not args.quiet)
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    from ddk_kernels.dispatch import available_backends, resolve_backend

    for device in ["cpu"] + (["cuda"] if _cuda() else []):
        print(f"{device}: auto -> {resolve_backend('auto', device)}")
        for name, reason in available_backends(device).items():
            print(f"  {name:<10} {'available' if not reason else 'unavailable: ' + reason}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddk", description="Domain-aware knowledge distillation (DDK).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="distill a student with KD and DDK on synthetic domains and compare")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=600, help="student optimizer steps per method")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)
    backends = sub.add_parser("backends", help="list the KD loss backends and why any cannot run")
    backends.set_defaults(func=_cmd_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
