"""Tests of ddk/data/tokenizer_check.py: the one tokenizer rule (the same probe ids, size and
special tokens; only padding rows may differ) on tiny local BPE tokenizers."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hf_models import make_model, make_tokenizer

from ddk.data.tokenizer_check import PROBE_TEXT, check_tokenizers, tokenizer_signature


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved byte-level BPE tokenizer (300 tokens) under ``<tmp>/a``."""
    root = tmp_path_factory.mktemp("tok")
    make_tokenizer(root / "a")
    return root / "a"


def _as_class(src: Path, dst: Path, **config: Any) -> Any:
    """The same ``tokenizer.json`` loaded with another ``tokenizer_config.json`` (class, options)."""
    from transformers import AutoTokenizer

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, **config}))
    return AutoTokenizer.from_pretrained(str(dst))


def test_probe_text_covers_the_ways_tokenizers_diverge() -> None:
    cats = {unicodedata.category(c) for c in PROBE_TEXT}
    assert PROBE_TEXT[0].islower()  # a prefix space changes token 0
    assert re.search(r"\d{3,}", PROBE_TEXT) and re.search(r" {4}", PROBE_TEXT) and "\t\t" in PROBE_TEXT
    assert "\n\n" in PROBE_TEXT and "\r\n" in PROBE_TEXT and "def " in PROBE_TEXT and "{" in PROBE_TEXT
    assert any("\u4e00" <= c <= "\u9fff" for c in PROBE_TEXT)  # CJK
    assert any(ord(c) >= 0x1F300 for c in PROBE_TEXT)  # emoji
    assert any(c.isalpha() and ord(c) > 127 for c in "naïve Ελληνικά") and {"Ll", "Lu", "Nd", "So"} <= cats


def test_check_tokenizers_accepts_the_same_tokenizer_loaded_as_another_class(folder: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(str(folder))
    b = _as_class(folder, tmp_path / "qwen", tokenizer_class="Qwen2Tokenizer")
    assert type(a).__name__ != type(b).__name__
    check_tokenizers(a, b, fn="distill")  # the rule is behaviour, not the class
    sig = json.loads(json.dumps(tokenizer_signature(a)))  # as a cache manifest stores it
    check_tokenizers(b, sig, fn="distill")
    assert sig["size"] == len(a) and sig["special"]["eos_token"] == ["<|endoftext|>", str(a.eos_token_id)]


def test_check_tokenizers_names_the_classes_and_first_differing_tokens_of_one_tokenizer_json(
    folder: Path, tmp_path: Path
) -> None:
    """The same ``tokenizer.json`` as two classes that give different ids (a prefix space): refused,
    naming the first differing probe tokens with their ids and both classes."""
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(str(folder))
    teacher = _as_class(folder, tmp_path / "gpt2", tokenizer_class="GPT2Tokenizer", add_prefix_space=True)
    assert teacher.get_vocab() == student.get_vocab()  # the old check (vocabularies) passed this pair
    with pytest.raises(ValueError) as info:
        check_tokenizers(student, teacher, fn="distill")
    msg = str(info.value)
    assert msg.startswith(
        "distill: teacher and student must tokenize identically (only padding rows of the output embeddings "
        "may differ); got different ids of the probe text from token 0 on ("
    )
    t_ids = teacher(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    s_ids = student(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    assert f"teacher [{t_ids[0]} 'Ġthe', " in msg and f"student [{s_ids[0]} 't', {s_ids[1]} 'he', " in msg
    assert f"Tokenizers: teacher GPT2Tokenizer from '{tmp_path / 'gpt2'}', student {type(student).__name__} " in msg
    assert "vocabulary sizes" not in msg


def test_check_tokenizers_refuses_a_larger_other_tokenizer_that_looks_padded(folder: Path, tmp_path: Path) -> None:
    """A teacher of another, larger tokenizer (400 vs 300 entries) is not taken for a padded one."""
    from transformers import AutoTokenizer

    student_tok = AutoTokenizer.from_pretrained(str(folder))
    teacher_tok = make_tokenizer(tmp_path / "big", vocab_size=400)
    student, teacher = make_model("llama", len(student_tok)), make_model("llama", len(teacher_tok))
    with pytest.raises(ValueError, match=r"got different vocabulary sizes \(teacher 400, student 300\); different ids"):
        check_tokenizers(student_tok, teacher_tok, student=student, teacher=teacher, fn="DDKTrainer")
    check_tokenizers(student_tok, student_tok, student=student, teacher=make_model("llama", 400))  # padded: allowed


def test_check_tokenizers_needs_model_rows_covering_the_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    student = make_model("llama", len(tok))
    with pytest.raises(ValueError, match=r"^distill: the student's vocabulary must cover the tokenizer's 300 tokens"):
        check_tokenizers(tok, tok, student=make_model("llama", 298), fn="distill")
    with pytest.raises(
        ValueError,
        match=r"^distill: the teacher's vocabulary must cover the student's 300 rows \(the student\) \(a teacher "
        r"wider by padding rows is sliced\); got 299 rows in the teacher\.",
    ):
        check_tokenizers(tok, tok, student=student, teacher=make_model("llama", 299), fn="distill")
    with pytest.raises(ValueError, match=r"teacher's vocabulary must cover the tokenizer's 300 tokens"):
        check_tokenizers(tok, None, teacher=make_model("llama", 299), fn="teacher-cache")


def test_check_tokenizers_names_a_different_special_token(folder: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    other = _as_class(folder, tmp_path / "eos", eos_token="<|pad|>")
    with pytest.raises(ValueError, match=r"got a different eos_token \(teacher '<\|pad\|>' \(id 1\), student"):
        check_tokenizers(tok, other)
    with pytest.raises(
        ValueError, match=r"^check_tokenizers: teacher_tokenizer must be a tokenizer or a tokenizer_sig"
    ):
        check_tokenizers(tok, {"size": 3})
