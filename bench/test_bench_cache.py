"""One distillation step with the online teacher against the same step from a top-k teacher cache.

Shapes: the demo's models (``ddk/recipes/configs/demo.yaml``: a Llama teacher hidden 192 x 3
layers, student 64 x 2, V=4096) and the experiment's (teacher 256 x 4, student 96 x 2), a batch
of 16 sequences of 128 tokens, float32 on the CPU. A step is ``ddk.engine.DistillStep``
forward + backward + AdamW: online, the teacher's forward and the fused KD loss; from the cache,
the fused sparse loss against ``k`` cached ids per position (k in {8, 32, 128}; the cached
tensors are made once from the same teacher, as ``ddk teacher-cache`` would store them).
``extra_info``: ``speedup`` = online median / this median, and the cache's bytes per position.

Run: ``.venv/bin/python -m pytest bench/test_bench_cache.py --benchmark-only --benchmark-json bench/results/cache.json``
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from ddk.data.teacher_cache import bytes_per_token

B, L, V = 16, 128, 4096
ROUNDS = int(os.environ.get("DDK_BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("DDK_BENCH_THREADS", "2"))
PRESETS = {"demo": ((192, 3, 512), (64, 2, 172)), "experiment": ((256, 4, 688), (96, 2, 256))}
_ONLINE: dict[str, float] = {}


def _llama(hidden: int, layers: int, inter: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = 4 if hidden % 8 == 0 and (hidden // 4) % 2 == 0 else 2
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=L,
                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    )  # fmt: skip


def _step(preset: str, k: int | None) -> Any:
    from ddk.engine.step import DistillStep, StepLoss, make_optimizer

    torch.set_num_threads(THREADS)
    (th, tl, ti), (sh, sl, si) = PRESETS[preset]
    teacher, student = _llama(th, tl, ti, 1).eval(), _llama(sh, sl, si, 2)
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
    dom = torch.arange(B) % 8
    cached = None
    if k is not None:
        with torch.no_grad():
            top = torch.log_softmax(teacher(input_ids=ids).logits, -1).topk(k, -1)
        cached = (top.indices, top.values.half().float(), 1 - top.values.exp().sum(-1))
    loss = StepLoss("fused", 0.2, 1.0, "forward_kl", 0.5, "auto", 8)
    mod = DistillStep(student, None if k is not None else teacher, loss)
    opt, _ = make_optimizer(mod, 1e-3, 0.01, 0, 100, 0.1)

    def step() -> None:
        loss, _ = mod(ids, ids, dom, None, cached=cached)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (AdamW state)
    return step


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("k", [None, 8, 32, 128], ids=["online", "k8", "k32", "k128"])
def test_bench_distill_step_online_vs_cache(benchmark: Any, preset: str, k: int | None) -> None:
    step = _step(preset, k)
    benchmark.group = f"distill step, {preset} models, B={B} L={L} V={V}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    if k is None:
        _ONLINE[preset] = median
        benchmark.extra_info["bytes_per_position"] = 0
    else:
        benchmark.extra_info["bytes_per_position"] = bytes_per_token(k)
        if preset in _ONLINE:
            benchmark.extra_info["speedup"] = round(_ONLINE[preset] / median, 3)
