"""A small, fully local DDK run on synthetic multi-domain token streams.

Each domain is a first-order Markov chain over its own block of the vocabulary. Domains differ
in size of that block (how much there is to learn) and in sharpness (how much structure the
chain carries), so under a fixed token budget a student learns some domains long before others. The recipe pretrains the teacher and a small base student (as in the paper, distillation starts from a
pretrained student), then distills copies of the base student at an equal token budget — plain KD
on a uniform mixture and DDK — with every DDK component in a plain PyTorch loop, and reports the
per-domain gap to the teacher.

This is the quick demonstration of the machinery; the real-text pipeline lives in the corpus
recipes.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ddk import KDLossOutput
from ddk.controller import DDKController
from ddk.discrepancy import DiscrepancyEstimator
from ddk.engine.methods import make_scheduler
from ddk.losses import kd_loss
from ddk.sampling import MixtureSampler


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the synthetic run (defaults finish in about a minute on 2 CPU cores)."""

    domain_tokens: tuple[int, ...] = (16, 32, 64, 128)
    domain_sharpness: tuple[float, ...] = (1.5, 1.5, 1.5, 1.5)
    seq_len: int = 33
    train_seqs_per_domain: int = 1500
    val_seqs_per_domain: int = 64
    teacher_hidden: int = 128
    student_hidden: int = 32
    teacher_steps: int = 400
    student_pretrain_steps: int = 40
    student_steps: int = 300
    batch_size: int = 64
    interval: int = 30
    gamma: float = 0.2
    temperature: float = 1.0
    alpha: float = 0.5
    lr: float = 3e-3
    seed: int = 0
    methods: tuple[str, ...] = field(default=("kd", "ddk"))


class TinyLM(nn.Module):
    """Next-token model ``logits[b, t] = f(token[b, t])``: embedding, a tanh layer, a head.

    ``forward(input_ids (B, L) int64, attention_mask=None) -> logits (B, L, V) float32``.
    """

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(input_ids))))


def make_domains(cfg: SyntheticConfig) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
    """Token sequences of every domain.

    Returns:
        ``(train, val, names)``: ``train`` is ``(D * train_seqs, seq_len)`` int64 ordered by domain
        (so a global sampler index is a row), ``val`` one ``(val_seqs, seq_len)`` tensor per domain.
    """
    if len(cfg.domain_tokens) != len(cfg.domain_sharpness):
        raise ValueError(
            "make_domains: domain_tokens and domain_sharpness must have one entry per domain; "
            f"got {len(cfg.domain_tokens)} and {len(cfg.domain_sharpness)}."
        )
    g = torch.Generator().manual_seed(cfg.seed)
    train, val, names = [], [], []
    offset = 0
    for k, sharp in zip(cfg.domain_tokens, cfg.domain_sharpness):
        trans = torch.softmax(sharp * torch.randn(k, k, generator=g, dtype=torch.float64) * 2.0, dim=-1)
        n = cfg.train_seqs_per_domain + cfg.val_seqs_per_domain
        seq = torch.empty(n, cfg.seq_len, dtype=torch.long)
        seq[:, 0] = torch.randint(0, k, (n,), generator=g)
        for t in range(1, cfg.seq_len):
            seq[:, t] = torch.multinomial(trans[seq[:, t - 1]], 1, generator=g).squeeze(-1)
        seq += offset
        offset += k
        train.append(seq[: cfg.train_seqs_per_domain])
        val.append(seq[cfg.train_seqs_per_domain :])
        names.append(f"v{k}-s{sharp:g}")
    return torch.cat(train), val, names


def _step_loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    cfg: SyntheticConfig,
    use_teacher: bool,
) -> KDLossOutput:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = student(inputs)
    n, v = logits.shape[0] * logits.shape[1], logits.shape[-1]
    tok_domains = domain_ids.unsqueeze(1).expand_as(targets).reshape(n)
    if use_teacher:
        with torch.no_grad():
            t_logits = teacher(inputs).reshape(n, v)
        gamma = cfg.gamma
    else:  # plain language modelling: the divergence term is switched off
        t_logits, gamma = logits.detach().reshape(n, v), 0.0
    return kd_loss(
        logits.reshape(n, v),
        t_logits,
        targets.reshape(n),
        domain_ids=tok_domains,
        num_domains=num_domains,
        gamma=gamma,
        temperature=cfg.temperature,
    )


def pretrain(
    train: torch.Tensor,
    names: list[str],
    cfg: SyntheticConfig,
    hidden: int,
    steps: int,
    seed: int,
    desc: str,
    progress: bool = True,
) -> TinyLM:
    """Language-model pretraining (CE only) of a ``TinyLM`` on a uniform mixture of the domains."""
    torch.manual_seed(seed)
    d = len(names)
    model = TinyLM(sum(cfg.domain_tokens), hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler = MixtureSampler([cfg.train_seqs_per_domain] * d, cfg.batch_size, seed=seed + 1)
    it = iter(sampler)
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        idx = torch.as_tensor(next(it))
        out = _step_loss(model, model, train[idx], sampler.domain_of(idx), d, cfg, False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return model


def train_teacher(train: torch.Tensor, names: list[str], cfg: SyntheticConfig, progress: bool = True) -> TinyLM:
    """Pretrain the (wide) teacher and freeze it."""
    teacher = pretrain(train, names, cfg, cfg.teacher_hidden, cfg.teacher_steps, cfg.seed, "teacher", progress)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill(
    method: str,
    base_student: TinyLM,
    teacher: TinyLM,
    train: torch.Tensor,
    estimator: DiscrepancyEstimator,
    names: list[str],
    cfg: SyntheticConfig,
    out_dir: Path,
    progress: bool = True,
) -> dict:
    """Distill a copy of ``base_student`` with ``method`` in ``{"kd", "ddk", "ddk-no-smoothing"}``.

    Returns:
        A JSON-ready summary: per-domain student/teacher CE and gap, final weights, samples seen.
    """
    d = len(names)
    student = copy.deepcopy(base_student)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    sampler = MixtureSampler([cfg.train_seqs_per_domain] * d, cfg.batch_size, seed=cfg.seed + 2, domain_names=names)
    smoother = make_scheduler(method, d, alpha=cfg.alpha)  # the engine's method table
    controller = DDKController(
        estimator, smoother, sampler, interval=cfg.interval, log_path=out_dir / f"{method}.metrics.jsonl"
    )
    controller.start(student)
    it = iter(sampler)
    for step in tqdm(range(1, cfg.student_steps + 1), desc=f"distill {method}", disable=not progress):
        idx = torch.as_tensor(next(it))
        out = _step_loss(student, teacher, train[idx], sampler.domain_of(idx), d, cfg, True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        controller.step_end(step, student)
    final = estimator.estimate(student)
    return {
        "method": method,
        "student_ce": final.student_ce.tolist(),
        "teacher_ce": final.teacher_ce.tolist(),
        "gap": final.gap.tolist(),
        "mean_gap": float(final.gap.mean()),
        "worst_gap": float(final.gap.max()),
        "final_weights": list(sampler.weights),
        "samples_per_domain": sampler.cumulative_counts().tolist(),
    }


def run(
    cfg: SyntheticConfig = SyntheticConfig(), out_dir: str | Path = "runs/demo", progress: bool = True
) -> list[dict]:
    """Build the data, pretrain the teacher, distill each method, write results and plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.perf_counter()
    train, val, names = make_domains(cfg)
    teacher = train_teacher(train, names, cfg, progress)
    base = pretrain(
        train, names, cfg, cfg.student_hidden, cfg.student_pretrain_steps, cfg.seed + 7, "base student", progress
    )
    validation = {name: [{"input_ids": v}] for name, v in zip(names, val)}
    estimator = DiscrepancyEstimator(validation, progress=False)
    estimator.compute_teacher(teacher)
    results = [distill(m, base, teacher, train, estimator, names, cfg, out, progress) for m in cfg.methods]
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    plots = []
    try:
        from ddk.recipes.plotting import plot_weights

        for m in cfg.methods:
            png = out / f"{m}.weights.png"
            plot_weights(out / f"{m}.metrics.jsonl", png)
            plots.append(str(png))
    except ImportError as exc:  # matplotlib missing: the numbers are still written
        print(f"plots skipped: {exc}")
    print(format_table(results, names))
    print(f"\nwall time {time.perf_counter() - t0:.1f} s; results in {out}/summary.json")
    for p in plots:
        print(f"plot: {p}")
    return results


def format_table(results: list[dict], names: list[str]) -> str:
    """Per-domain CE gap (student - teacher, nats/token) of each method, plus mean and worst."""
    head = f"{'method':<18}" + "".join(f"{n:>10}" for n in names) + f"{'mean':>10}{'worst':>10}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r['method']:<18}"
            + "".join(f"{g:>10.4f}" for g in r["gap"])
            + f"{r['mean_gap']:>10.4f}{r['worst_gap']:>10.4f}"
        )
    rows.append(f"{'teacher CE':<18}" + "".join(f"{c:>10.4f}" for c in results[0]["teacher_ce"]))
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    run()
