"""The sizing tables of docs/guides/scale.md, from the published configs alone (no weights).

    .venv/bin/python bench/sizing.py                                 # print the tables
    .venv/bin/python bench/sizing.py --write docs/guides/scale.md    # rewrite them in the page
    .venv/bin/python bench/sizing.py --check docs/guides/scale.md    # exit 1 if the page is stale

The configs are ``transformers`` config objects built in code with the published
hyper-parameters of each model (no hub access): Qwen1.5-14B and Qwen1.5-1.8B (``Qwen2Config``,
untied, vocabularies 152064 and 151936), LLaMA2-13B, TinyLlama-1.1B and Llama-2-70B
(``LlamaConfig``, untied, vocabulary 32000; TinyLlama and Llama-2-70B use grouped-query attention
with 4 and 8 key/value heads). The arithmetic is ``ddk.engine.sizing``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddk.engine.sizing import GIB, PLACEMENTS, ModelShape, Workload, estimate_memory, flops_per_token

BEGIN, END = "<!-- sizing-tables:begin -->", "<!-- sizing-tables:end -->"
PAPER_TOKENS = 15_000_000_000  # the paper's distillation budget (about 15B tokens)


def published_configs() -> dict[str, Any]:
    """``{name: transformers config}`` of the five models, with their published hyper-parameters."""
    from transformers import LlamaConfig, Qwen2Config

    def qwen(vocab: int, hidden: int, inter: int, layers: int, heads: int) -> Any:
        return Qwen2Config(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            tie_word_embeddings=False,
        )

    def llama(hidden: int, inter: int, layers: int, heads: int, kv: int) -> Any:
        return LlamaConfig(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            tie_word_embeddings=False,
        )

    return {
        "Qwen1.5-14B": qwen(152064, 5120, 13696, 40, 40),
        "Qwen1.5-1.8B": qwen(151936, 2048, 5504, 24, 16),
        "LLaMA2-13B": llama(5120, 13824, 40, 40, 40),
        "TinyLlama-1.1B": llama(2048, 5632, 22, 32, 4),
        "Llama-2-70B": llama(8192, 28672, 80, 64, 8),
    }


PAIRS = (("Qwen1.5-14B", "Qwen1.5-1.8B"), ("LLaMA2-13B", "TinyLlama-1.1B"), ("Llama-2-70B", "TinyLlama-1.1B"))
PLACEMENT_NAMES = {
    "replicated": "replicated",
    "fsdp": "FSDP2-sharded",
    "cpu_offload": "CPU-offloaded",
    "cache": "top-k cache",
}


def _gib(b: int) -> str:
    return f"{b / GIB:.1f}"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def tables(workload: Workload, tokens: int = PAPER_TOKENS) -> str:
    """The Markdown of the three tables for ``workload``."""
    cfg = {name: ModelShape.from_config(c) for name, c in published_configs().items()}
    ckpt = Workload(**{**workload.__dict__, "checkpointing": True})
    ddp = Workload(**{**workload.__dict__, "student": "ddp"})
    out = [
        f"Workload: R = {workload.gpus} GPUs, micro-batch {workload.micro_batch} x {workload.seq_len} tokens "
        f"= {workload.tokens:,} tokens per GPU, top-k {workload.top_k}, {tokens / 1e9:g}B tokens for the totals. "
        "GiB = 2^30 bytes.",
        "",
        "**Models** (parameters from the config arithmetic; FLOPs per trained token of one step):",
        "",
        _row(
            [
                "model",
                "parameters",
                "layers x hidden / MLP",
                "heads / kv heads",
                "vocabulary",
                "block params",
                "output layer",
            ]
        ),
        _row(["---"] + ["---:"] * 6),
    ]
    for name, m in cfg.items():
        out.append(
            _row(
                [
                    name,
                    f"{m.parameters:,}",
                    f"{m.layers} x {m.hidden} / {m.intermediate}",
                    f"{m.heads} / {m.kv_heads}",
                    f"{m.vocab:,}",
                    f"{m.block_params:,}",
                    f"{m.output_params:,}",
                ]
            )
        )
    out += [
        "",
        _row(
            [
                "teacher -> student",
                "teacher fwd GFLOP/token",
                "student fwd+bwd GFLOP/token",
                "of which output layers",
                "step GFLOP/token",
                f"step FLOPs for {tokens / 1e9:g}B tokens",
                "from a cache",
                "with checkpointing",
            ]
        ),
        _row(["---"] + ["---:"] * 7),
    ]
    for t, s in PAIRS:
        f = flops_per_token(cfg[t], cfg[s], workload.seq_len)
        fc = flops_per_token(cfg[t], cfg[s], workload.seq_len, cache=True)
        fk = flops_per_token(cfg[t], cfg[s], workload.seq_len, checkpointing=True)
        out.append(
            _row(
                [
                    f"{t} -> {s}",
                    f"{f.teacher_forward / 1e9:.1f}",
                    f"{f.student_forward_backward / 1e9:.1f}",
                    f"{(f.teacher_output_layer + f.student_output_layer) / 1e9:.1f}",
                    f"{f.total / 1e9:.1f}",
                    f"{f.total * tokens:.2e}",
                    f"{fc.total / 1e9:.1f}",
                    f"{fk.total / 1e9:.1f}",
                ]
            )
        )
    out += [
        "",
        "**Per-GPU memory** (GiB; the student FSDP2-sharded over R except in the DDP column; no activation "
        "checkpointing except in its column). What `ddk distill` runs: without `--fsdp`, the replicated row's DDP "
        "column; with `--fsdp`, the FSDP2-sharded row; with `--fsdp --teacher-offload cpu`, the CPU-offloaded row "
        "(the teacher's shards in host RAM); with `--teacher-cache`, the top-k cache row, either way:",
        "",
        _row(
            [
                "teacher -> student",
                "teacher placement",
                "teacher on GPU",
                "student states + gathered + bf16 copies",
                "activations",
                "loss fused / logits",
                "total, fused loss",
                "total, logits loss",
                "total, fused, checkpointing",
                "total, fused, DDP student",
                "host RAM per rank",
                "cache on disk",
            ]
        ),
        _row(["---", "---"] + ["---:"] * 10),
    ]
    for t, s in PAIRS:
        for placement in PLACEMENTS:
            e = estimate_memory(cfg[t], cfg[s], workload, placement)
            disk = (
                f"{e.cache_disk_per_token} B/token = {e.cache_disk_per_token * tokens / 1e12:.2f} TB"
                if e.cache_disk_per_token
                else "-"
            )
            out.append(
                _row(
                    [
                        f"{t} -> {s}",
                        PLACEMENT_NAMES[placement],
                        _gib(e.teacher),
                        f"{_gib(e.student_states)} + {_gib(e.student_gathered)} + {_gib(e.weight_copies)}",
                        _gib(e.activations),
                        f"{_gib(e.loss_fused)} / {_gib(e.loss_logits)}",
                        f"**{_gib(e.total('fused'))}**",
                        _gib(e.total("logits")),
                        _gib(estimate_memory(cfg[t], cfg[s], ckpt, placement).total("fused")),
                        _gib(estimate_memory(cfg[t], cfg[s], ddp, placement).total("fused")),
                        _gib(e.teacher_host) if e.teacher_host else "-",
                        disk,
                    ]
                )
            )
    return "\n".join(out) + "\n"


def replace_between(text: str, body: str) -> str:
    """``text`` with what lies between the ``BEGIN`` and ``END`` markers replaced by ``body``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"sizing: the page must hold one {BEGIN} ... {END} pair")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = Workload()
    p.add_argument("--gpus", type=int, default=w.gpus)
    p.add_argument("--micro-batch", type=int, default=w.micro_batch)
    p.add_argument("--seq-len", type=int, default=w.seq_len)
    p.add_argument("--top-k", type=int, default=w.top_k)
    p.add_argument("--tokens", type=float, default=PAPER_TOKENS, help="tokens of the run (totals)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="rewrite the tables of this Markdown page")
    group.add_argument("--check", type=Path, help="exit 1 if this page's tables differ")
    a = p.parse_args(argv)
    body = tables(Workload(gpus=a.gpus, micro_batch=a.micro_batch, seq_len=a.seq_len, top_k=a.top_k), int(a.tokens))
    if a.write is None and a.check is None:
        sys.stdout.write(body)
        return 0
    page = a.write or a.check
    text = page.read_text()
    new = replace_between(text, body)
    if a.check is not None:
        if new != text:
            print(f"{page}: the sizing tables are stale; rerun: python bench/sizing.py --write {page}", file=sys.stderr)
            return 1
        return 0
    page.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
