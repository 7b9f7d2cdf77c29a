"""A whole distillation step, the number users feel: ``ddk distill``'s step against plain-loop peers.

Builds a teacher and a student with random weights (no hub) of a preset's shapes and times
optimizer steps (AdamW, float32 master weights, bf16 autocast on CUDA) of:

* ``ddk``: the step module of ``ddk distill`` (``ddk.engine.DistillStep``: the fused
  ``lm_head`` + KD loss, ``CE + gamma * KL(p_T || p_S)``) with DDK's mixture: ``MixtureSampler``
  batches and a ``DDKController`` whose estimator runs every ``--interval`` steps (its share of
  the time is reported);
* ``kd``: the same step with a uniform mixture and no estimator (DDK's overhead = ddk / kd - 1);
* ``logits``: KD on full logits as a plain transformers loop computes it (``model(...).logits`` of
  both models, ``log_softmax``, ``F.kl_div``, ``F.cross_entropy``);
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``beta=0``: forward KL, the same loss) on
  both models' hidden states and ``lm_head`` weights, skipped when ``liger_kernel`` is missing;
* ``models``: the two models without any loss (``hidden.sum() * 0``), the floor the loss adds to:
  the loss's share of a step is ``1 - models / variant``.

Per variant: median step time, tokens/s, peak memory (``torch.cuda.max_memory_allocated`` on
CUDA, the RSS peak on the CPU) and, with ``--max-batch``, the largest power-of-two batch that
fits (CUDA only). The first step's loss of ``kd``, ``logits`` and ``liger`` is the same quantity
from the same weights and batch (``ddk`` runs ``kd``'s step on its own mixture): the script prints and stores the spread, and fails
(exit 1) when it exceeds a bf16-sized tolerance, so a broken variant cannot report a fast number.

    python bench/gpu/step_bench.py --preset qwen2-1.5b-0.5b --seq 2048 --batch 4 --max-batch --out $OUT/step.json
    python bench/gpu/step_bench.py --preset tiny --device cpu            # the CPU check of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VARIANTS = ("models", "logits", "liger", "kd", "ddk")
LOSS_VARIANTS = ("logits", "liger", "kd")  # ddk: kd's step on DDK's mixture, so its first batch differs


@dataclass(frozen=True)
class Shape:
    """A causal LM's shape (Qwen2-style: grouped-query attention, tied embeddings)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


PRESETS: dict[str, tuple[Shape, Shape, int]] = {  # name -> (teacher, student, vocabulary)
    "qwen2-1.5b-0.5b": (Shape(1536, 28, 12, 2, 8960), Shape(896, 24, 14, 2, 4864), 151936),
    "qwen2-7b-1.5b": (Shape(3584, 28, 28, 4, 18944), Shape(1536, 28, 12, 2, 8960), 152064),
    "cpu-small": (Shape(512, 2, 8, 2, 1024), Shape(256, 2, 4, 2, 512), 32000),
    "tiny": (Shape(64, 2, 4, 2, 128), Shape(32, 1, 2, 1, 64), 512),
}


def build_model(shape: Shape, vocab: int, seq: int, seed: int, dtype: torch.dtype, device: torch.device) -> Any:
    """A ``Qwen2ForCausalLM`` with random weights of ``shape``, on ``device`` in ``dtype``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(seq, 64),
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)


def peak_bytes(device: torch.device) -> int:
    """Peak memory since the last ``reset_peak``: CUDA allocator peak, else the process RSS peak."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """The models, data and DDK components shared by every variant (the student is reset per variant)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.autocast = (
            torch.bfloat16 if (args.dtype == "bf16" or (args.dtype == "auto" and self.device.type == "cuda")) else None
        )
        t_shape, s_shape, self.vocab = PRESETS[args.preset]
        self.teacher = build_model(t_shape, self.vocab, args.seq, 1, self.autocast or torch.float32, self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = build_model(s_shape, self.vocab, args.seq, 2, torch.float32, self.device)
        self.initial = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        self.domains = 4
        g = torch.Generator().manual_seed(0)
        n_train = max(64, 4 * args.batch)
        self.train = torch.randint(0, self.vocab, (self.domains * n_train, args.seq), generator=g)
        val = torch.randint(0, self.vocab, (self.domains, args.val_batches * args.eval_batch, args.seq), generator=g)
        self.validation = {
            f"d{i}": [{"input_ids": val[i, j : j + args.eval_batch]} for j in range(0, val.shape[1], args.eval_batch)]
            for i in range(self.domains)
        }
        self.sizes = [n_train] * self.domains

    def fresh_student(self) -> Any:
        self.student.load_state_dict(self.initial)
        self.student.train()
        return self.student

    def autocast_ctx(self) -> Any:
        return torch.autocast(
            self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None
        )


def make_variant(bench: Bench, name: str, batch: int) -> tuple[Callable[[int], float], dict[str, float]]:
    """``(step(i) -> loss, timers)`` for ``name``; ``timers["estimator_s"]`` accumulates the estimator's time."""
    from ddk import DDKController, DiscrepancyEstimator, FactorSmoother, MixtureSampler
    from ddk.engine.step import DistillStep, StepLoss, make_optimizer

    args, device = bench.args, bench.device
    student, teacher = bench.fresh_student(), bench.teacher
    gamma = args.gamma
    opt, _ = make_optimizer(student, 1e-5, 0.0, 0, 1000, 1.0)
    timers = {"estimator_s": 0.0, "estimates": 0.0}
    uniform = MixtureSampler(bench.sizes, batch, seed=0)

    def fixed_batch(i: int) -> torch.Tensor:
        return bench.train[torch.as_tensor(uniform.next_global_batch())].to(device)

    if name in ("ddk", "kd"):
        step_loss = StepLoss("fused", gamma, 1.0, "forward_kl", 0.5, "auto", bench.domains, bench.autocast)
        step_mod = DistillStep(student, teacher, step_loss)
        sampler = MixtureSampler(bench.sizes, batch, seed=0)
        controller = None
        if name == "ddk":
            est = DiscrepancyEstimator(bench.validation, loss_fn=step_loss.validation_ce, device=device, progress=False)
            est.compute_teacher(teacher)
            controller = DDKController(est, FactorSmoother(bench.domains), sampler, interval=args.interval)
            controller.start(step_mod)

        def step(i: int) -> float:
            idx = torch.as_tensor(sampler.next_global_batch())
            ids = bench.train[idx].to(device)
            dom = (idx // bench.sizes[0]).to(device)
            loss, _ = step_mod(ids, ids, dom)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if controller is not None:
                sync(device)
                t0 = time.perf_counter()
                updated = controller.step_end(i, step_mod) is not None
                sync(device)
                timers["estimator_s"] += time.perf_counter() - t0
                timers["estimates"] += float(updated)
            return float(loss.detach())

        return step, timers

    if name == "logits":

        def step(i: int) -> float:
            ids = fixed_batch(i)
            with bench.autocast_ctx():
                zs = student(input_ids=ids).logits[:, :-1].float()
                with torch.no_grad():
                    zt = teacher(input_ids=ids).logits[:, :-1, : zs.shape[-1]].float()
                labels = ids[:, 1:]
                ce = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), labels.reshape(-1))
                kl = F.kl_div(
                    F.log_softmax(zs, -1).reshape(-1, zs.shape[-1]),
                    F.log_softmax(zt, -1).reshape(-1, zs.shape[-1]),
                    log_target=True,
                    reduction="batchmean",
                )
                loss = ce + gamma * kl
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        return step, timers

    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        jsd = LigerFusedLinearJSDLoss(
            weight_hard_loss=1.0, weight_soft_loss=gamma, beta=0.0, temperature=1.0, compiled=device.type == "cuda"
        )  # on the CPU torch.compile recompiles per chunk

        def step(i: int) -> float:
            ids = fixed_batch(i)
            with bench.autocast_ctx():
                hs = student.model(input_ids=ids).last_hidden_state[:, :-1]
                with torch.no_grad():
                    ht = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
                ws = student.lm_head.weight
                wt = teacher.lm_head.weight[: ws.shape[0]]
                if bench.autocast is not None:
                    hs, ws, ht, wt = (
                        hs.to(bench.autocast),
                        ws.to(bench.autocast),
                        ht.to(bench.autocast),
                        wt.to(bench.autocast),
                    )
                loss = jsd(hs.reshape(-1, hs.shape[-1]), ws, ht.reshape(-1, ht.shape[-1]), wt, ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        return step, timers

    if name == "models":

        def step(i: int) -> float:
            ids = fixed_batch(i)
            with bench.autocast_ctx():
                hs = student.model(input_ids=ids).last_hidden_state
                with torch.no_grad():
                    teacher.model(input_ids=ids)
                loss = hs.float().sum() * 0 + (student.lm_head.weight.float().sum() * 0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        return step, timers
    raise ValueError(f"step_bench: variant must be one of {VARIANTS}; got {name!r}.")


def time_variant(bench: Bench, name: str, batch: int) -> dict[str, Any]:
    """Warm-up step, then ``--steps`` timed steps: median time, tokens/s, peak memory, first loss."""
    step, timers = make_variant(bench, name, batch)
    reset_peak(bench.device)
    first = step(1)
    times = []
    timers["estimator_s"], timers["estimates"] = 0.0, 0.0
    for i in range(2, bench.args.steps + 2):
        sync(bench.device)
        t0 = time.perf_counter()
        step(i)
        sync(bench.device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = batch * bench.args.seq
    return {
        "variant": name,
        "batch": batch,
        "median_s": med,
        "tokens_per_s": tokens / med,
        "first_loss": first,
        "peak_mib": peak_bytes(bench.device) / 2**20,
        "estimator_share": timers["estimator_s"] / sum(times),
        "estimate_s": timers["estimator_s"] / timers["estimates"] if timers["estimates"] else 0.0,
        "steps": len(times),
    }


def max_batch(bench: Bench, name: str, limit: int) -> int:
    """The largest power-of-two batch (<= ``limit``) whose step runs without running out of CUDA memory."""
    best, b = 0, 1
    while b <= limit:
        try:
            step, _ = make_variant(bench, name, b)
            step(1)
            best = b
        except torch.OutOfMemoryError:
            break
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        b *= 2
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    have_liger = True
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        have_liger = False
    results: dict[str, Any] = {}
    for name in args.variants:
        if name == "liger" and not have_liger:
            print("liger: skipped (liger_kernel is not installed)")
            continue
        results[name] = time_variant(bench, name, args.batch)
        if args.max_batch and bench.device.type == "cuda":
            results[name]["max_batch"] = max_batch(bench, name, args.max_batch_limit)
        print(json.dumps(results[name]))
    if "models" in results:
        for r in results.values():
            r["loss_share"] = 1.0 - results["models"]["median_s"] / r["median_s"]
    if "ddk" in results and "kd" in results:
        results["ddk_overhead"] = results["ddk"]["median_s"] / results["kd"]["median_s"] - 1.0
        # one estimate every K steps, amortised: what DDK adds at the paper's K = 1000
        results["ddk_overhead_k1000"] = results["ddk"]["estimate_s"] / (1000 * results["kd"]["median_s"])
    losses = [results[n]["first_loss"] for n in LOSS_VARIANTS if n in results]
    spread = (max(losses) - min(losses)) / max(abs(statistics.mean(losses)), 1e-12) if len(losses) > 1 else 0.0
    results["first_loss_rel_spread"] = spread
    results["config"] = {
        **vars(args),
        "device_name": torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    return results


def format_table(results: dict[str, Any]) -> str:
    rows = [
        "| variant | batch | median step | tokens/s | peak memory | loss share | largest batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        share = f"{r['loss_share']:.1%}" if "loss_share" in r and name != "models" else ""
        rows.append(
            f"| {name} | {r['batch']} | {r['median_s'] * 1e3:.1f} ms | {r['tokens_per_s']:,.0f} | "
            f"{r['peak_mib']:,.0f} MiB | {share} | {r.get('max_batch', '')} |"
        )
    if "ddk_overhead" in results:
        rows.append("")
        rows.append(
            f"DDK over KD: {results['ddk_overhead']:+.2%} measured with an estimate every "
            f"{results['config']['interval']} steps (estimator share {results['ddk']['estimator_share']:.2%}, "
            f"{results['ddk']['estimate_s'] * 1e3:.1f} ms per estimate); at K = 1000: "
            f"{results['ddk_overhead_k1000']:+.3%}"
        )
    return "\n".join(rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2-1.5b-0.5b", help="teacher/student shapes")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up step)")
    p.add_argument(
        "--interval", type=int, default=2, help="DDK interval K of the ddk variant (estimator every K steps)"
    )
    p.add_argument("--val-batches", type=int, default=1, help="validation batches per domain")
    p.add_argument("--eval-batch", type=int, default=4, help="sequences per validation batch")
    p.add_argument("--gamma", type=float, default=0.2)
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 autocast on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument(
        "--max-batch", action="store_true", help="find the largest power-of-two batch of each variant (CUDA)"
    )
    p.add_argument("--max-batch-limit", type=int, default=64)
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest relative spread of the variants' first losses (default 2e-2 with bf16, 1e-4 fp32)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    results = run(args)
    print(format_table(results))
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and torch.device(args.device).type == "cuda")
    tol = args.tolerance if args.tolerance is not None else (2e-2 if bf16 else 1e-4)
    spread = results["first_loss_rel_spread"]
    print(f"first-step losses agree within {spread:.2e} relative (tolerance {tol:g})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if math.isfinite(spread) and spread <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
