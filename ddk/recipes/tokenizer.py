"""Byte-level BPE tokenizer trained on a corpus' training split, used as a ``transformers``
``PreTrainedTokenizerFast`` (teacher and student share it)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["EOS", "PAD", "load_tokenizer", "train_tokenizer", "tokenizer_fingerprint"]

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike[str], *, vocab_size: int = 4096, min_frequency: int = 2
) -> Any:
    """Train a byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training texts (only the training split: validation stays unseen).
        out_dir: folder written with ``save_pretrained`` (atomically: a temp folder is renamed).
        vocab_size: total vocabulary including the 256 byte symbols and 2 special tokens.
        min_frequency: minimum pair count for a merge.

    Returns:
        The ``transformers.PreTrainedTokenizerFast`` (``eos_token``/``bos_token`` =
        ``<|endoftext|>``, ``pad_token`` = ``<|pad|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(
            f"train_tokenizer: vocab_size must be an int >= 300 (256 bytes + merges + specials); got {vocab_size!r}."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    fast.save_pretrained(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return fast


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a tokenizer saved by ``train_tokenizer`` (a ``PreTrainedTokenizerFast``)."""
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise ValueError(
            f"load_tokenizer: path must be a folder with tokenizer.json (from train_tokenizer); got {str(p)!r}."
        )
    return PreTrainedTokenizerFast.from_pretrained(str(p))


def tokenizer_fingerprint(path: str | os.PathLike[str]) -> str:
    """Short hash of ``tokenizer.json`` (keys caches of token ids and teachers)."""
    data = (Path(path) / "tokenizer.json").read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _vocab_of(path: str | os.PathLike[str]) -> int:
    return len(json.loads((Path(path) / "tokenizer.json").read_text())["model"]["vocab"])
