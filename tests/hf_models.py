"""Tiny Hugging Face model folders of several families, built locally (no hub), for the tests.

* :func:`make_tokenizer` trains a byte-level BPE tokenizer on a few lines and saves it.
* :func:`make_pair` saves a teacher and a student of one family with ``save_pretrained``:

  - ``"llama"``: ``LlamaForCausalLM`` pair, untied, same vocabulary;
  - ``"qwen2"``: ``Qwen2ForCausalLM`` pair whose *teacher* vocabulary is padded larger than the
    tokenizer (as Qwen's 152064 vs 151936 rows), student tied like small Qwen2 models;
  - ``"gpt2"``: ``GPT2LMHeadModel`` pair with tied input/output embeddings;
  - ``"gemma2"``: ``Gemma2ForCausalLM`` pair with final logit soft-capping (tied);
  - ``"phi"``: ``PhiForCausalLM`` pair, whose ``lm_head`` has a bias.

  The student folder also holds the tokenizer (so ``AutoTokenizer.from_pretrained(student)``
  works, as it does for a user's saved model).
* :func:`write_jsonl` writes a small domain-labelled corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "gpt2", "gemma2", "phi")
FUSED_FAMILIES = FAMILIES  # every family: soft-capping (gemma2) and lm_head biases (phi) are computed in the tiles
CASES = [(f, loss) for f in FAMILIES for loss in ("fused", "logits") if loss == "logits" or f in FUSED_FAMILIES]

_WORDS = {
    "code": "def return import class self for while if else print lambda yield value index list dict".split(),
    "prose": "the of and to in she he was that it her his had with for as you not be but at".split(),
    "math": "let x y z be integer prime sum over where equals proof lemma theorem hence real".split(),
}


def domain_text(domain: str, rng: random.Random, words: int = 40) -> str:
    """A pseudo-document of ``domain`` (``code``, ``prose`` or ``math``) with its own word distribution."""
    vocab = _WORDS[domain]
    return " ".join(rng.choice(vocab) for _ in range(words))


def make_tokenizer(path: str | Path, vocab_size: int = 300) -> Any:
    """Train and save a byte-level BPE tokenizer (``eos_token`` ``<|endoftext|>``, ``pad_token`` ``<|pad|>``)."""
    from ddk.recipes.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [domain_text(d, rng) for d in _WORDS for _ in range(50)]
    return train_tokenizer(texts, path, vocab_size=vocab_size, min_frequency=1)


def _config(family: str, vocab: int, hidden: int, layers: int, tie: bool, dropout: float) -> Any:
    if family in ("llama", "qwen2"):  # the same decoder shape; Qwen2 with grouped-query attention
        from transformers import LlamaConfig, Qwen2Config

        cls, kv_heads = (LlamaConfig, 2) if family == "llama" else (Qwen2Config, 1)
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=kv_heads,
            max_position_embeddings=256,
            tie_word_embeddings=tie,
            attention_dropout=dropout,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    if family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=2,
            n_positions=256,
            tie_word_embeddings=True,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    if family == "gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=hidden // 2,
            max_position_embeddings=256,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            sliding_window=64,
            tie_word_embeddings=True,
            attention_dropout=dropout,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    if family == "phi":
        from transformers import PhiConfig

        return PhiConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attention_dropout=dropout,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    raise ValueError(f"unknown family {family!r}; pick one of {FAMILIES}")


def make_model(
    family: str,
    vocab: int,
    *,
    hidden: int = 32,
    layers: int = 1,
    tie: bool | None = None,
    dropout: float = 0.0,
    seed: int = 0,
) -> Any:
    """A randomly initialised causal LM of ``family`` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    tie = {"llama": False, "qwen2": True, "gpt2": True, "gemma2": True, "phi": False}[family] if tie is None else tie
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, vocab, hidden, layers, tie, dropout))
    return model.eval()


def make_pair(
    root: str | Path, family: str = "llama", *, dropout: float = 0.0, tokenizer_vocab: int = 300
) -> tuple[Path, Path]:
    """Save ``root/teacher`` and ``root/student`` (student with the tokenizer); return both folders.

    The teacher is wider (hidden 48, 2 layers) than the student (hidden 32, 1 layer); for
    ``qwen2`` its vocabulary has 8 padding rows more than the tokenizer.
    """
    root = Path(root)
    tok = make_tokenizer(root / "tokenizer", vocab_size=tokenizer_vocab)
    vocab = len(tok)
    t_vocab = vocab + 8 if family == "qwen2" else vocab
    teacher = make_model(family, t_vocab, hidden=48, layers=2, seed=1)
    student = make_model(family, vocab, hidden=32, layers=1, dropout=dropout, seed=2)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    return root / "teacher", root / "student"


def write_jsonl(
    path: str | Path,
    docs_per_domain: int = 30,
    domains: tuple[str, ...] = ("code", "prose", "math"),
    seed: int = 0,
    words: int = 40,
    domain_field: str = "domain",
    text_field: str = "text",
) -> Path:
    """A JSONL corpus with ``docs_per_domain`` records per domain, shuffled."""
    rng = random.Random(seed)
    recs = [{domain_field: d, text_field: domain_text(d, rng, words)} for d in domains for _ in range(docs_per_domain)]
    rng.shuffle(recs)
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path
