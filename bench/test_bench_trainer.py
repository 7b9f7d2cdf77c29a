"""One ``DDKTrainer`` optimizer step on the CPU: the fused loss against the full-logits path.

Shape: a Llama student (hidden 256, 2 layers) and teacher (hidden 512, 2 layers), both with
V=32000, B=8 sequences of L=256 tokens, float32, forward KL, gamma=0.2. A step is what
``Trainer.training_step`` does plus the optimizer: the teacher forward, the student forward and
backward through ``DDKTrainer.compute_loss`` (``args.loss = "fused"`` or ``"logits"``), AdamW.

Time: pytest-benchmark (``DDK_BENCH_ROUNDS`` rounds, default 3, after one warm-up step). Peak
memory: the same step in a fresh subprocess (``python bench/test_bench_trainer.py LOSS``) after
one warm-up step (so AdamW's state exists), the peak RSS above the RSS before the step
(``VmHWM`` after ``/proc/self/clear_refs``), ``extra_info["peak_mb"]``.

Run: ``.venv/bin/python -m pytest bench/test_bench_trainer.py --benchmark-only --benchmark-json bench/results/trainer.json``
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import reset_peak, status_kb

V, B, L = 32000, 8, 256
ROUNDS = int(os.environ.get("DDK_BENCH_ROUNDS", "3"))
THREADS = int(os.environ.get("DDK_BENCH_THREADS", "2"))
_ROOT = Path(__file__).resolve().parents[1]
_RESULTS: dict[str, dict[str, float]] = {}


def _tokenizer(folder: Path) -> Any:
    """A word-level tokenizer with exactly V entries (EOS 0, PAD 1), saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


def make_trainer(loss: str, folder: Path) -> tuple[Any, Any]:
    """``(trainer, step)``: a DDKTrainer on random 3-domain text and a function running one optimizer step."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk.integrations.transformers import DDKConfig, DDKTrainer

    torch.set_num_threads(THREADS)
    tok = _tokenizer(folder / "tok")

    def llama(hidden: int, seed: int) -> Any:
        torch.manual_seed(seed)
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=V,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=L,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=1,
            )
        )

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(2, V, (300,), generator=g)) for _ in range(3 * 24)]
    records = Dataset.from_dict({"text": texts, "domain": [f"d{i % 3}" for i in range(len(texts))]})
    args = DDKConfig(
        output_dir=str(folder / "run"),
        max_steps=100,
        per_device_train_batch_size=B,
        learning_rate=1e-4,
        seq_len=L,
        val_samples=2,
        interval=1000,
        method="kd",
        loss=loss,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = DDKTrainer(
        model=llama(256, 1), teacher=llama(512, 2), args=args, train_dataset=records, processing_class=tok
    )
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    model = trainer.model.train()

    def step() -> float:
        loss_value = trainer.compute_loss(model, batch, num_items_in_batch=n_items)
        loss_value.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss_value.detach())

    return trainer, step


def measure_in_this_process(loss: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        _, step = make_trainer(loss, Path(d))
        step()  # warm-up: AdamW's state, allocator pools
        gc.collect()
        before = status_kb("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        value = step()
        dt = time.perf_counter() - t0
        return {"loss": value, "time_s": dt, "peak_mb": (status_kb("VmHWM") - before) / 1024}


def measure_in_subprocess(loss: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, loss], capture_output=True, text=True, env=env, cwd=_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{loss} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("loss", ["logits", "fused"])
def test_bench_ddktrainer_step(benchmark, loss: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, step = make_trainer(loss, tmp_path)
    step()  # warm-up
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    mem = measure_in_subprocess(loss)
    _RESULTS[loss] = {"time_s": benchmark.stats.stats.median, "peak_mb": mem["peak_mb"]}
    benchmark.extra_info.update(
        {
            "v": V,
            "b": B,
            "l": L,
            "peak_mb": round(mem["peak_mb"], 1),
            "threads": THREADS,
            "subprocess_time_s": round(mem["time_s"], 3),
        }
    )
    if loss == "fused" and "logits" in _RESULTS:
        benchmark.extra_info["time_vs_logits"] = round(_RESULTS["fused"]["time_s"] / _RESULTS["logits"]["time_s"], 3)
        benchmark.extra_info["peak_vs_logits"] = round(_RESULTS["fused"]["peak_mb"] / _RESULTS["logits"]["peak_mb"], 3)


if __name__ == "__main__":  # worker: python bench/test_bench_trainer.py LOSS
    print(json.dumps(measure_in_this_process(sys.argv[1])))
