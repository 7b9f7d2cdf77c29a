"""Tests of ddk/engine/models.py: loading the teacher and student of a run and checking their
vocabularies, on the tiny models of ``recipe_cases`` (the ``recipe`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_recipe_teacher_with_another_tokenizer_is_an_error_naming_both(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from hf_models import make_model, make_tokenizer

    from ddk.engine.models import load_models

    root, cfg = recipe
    other = tmp_path / "teacher"
    tok = make_tokenizer(tmp_path / "tok", vocab_size=310)  # another tokenizer of the same size class
    make_model("llama", len(tok) + 40).save_pretrained(str(other))
    tok.save_pretrained(str(other))
    with pytest.raises(ValueError) as info:
        load_models(dataclasses.replace(cfg, teacher=str(other)), torch.device("cpu"))
    msg = str(info.value)
    assert msg.startswith("distill: teacher and student must share a tokenizer; got different vocabularies in ")
    assert f"{str(other)!r} ({len(tok)} tokens) and {cfg.student!r} (" in msg


def test_recipe_teacher_vocabulary_narrower_is_an_error_wider_is_sliced(recipe) -> None:  # type: ignore[no-untyped-def]
    from hf_models import make_model
    from transformers import AutoTokenizer

    from ddk.engine.models import check_vocabularies

    root, cfg = recipe
    tok = AutoTokenizer.from_pretrained(cfg.student)
    student = make_model("llama", len(tok))
    with pytest.raises(
        ValueError,
        match=rf"^distill: the teacher's vocabulary must cover the student's \(a teacher wider "
        rf"by padding rows is sliced\); got teacher the teacher with {len(tok) - 1} rows "
        rf"and student the student with {len(tok)}\.",
    ):
        check_vocabularies(make_model("llama", len(tok) - 1), student, tok)
    check_vocabularies(make_model("llama", len(tok) + 8), student, tok)
    with pytest.raises(
        ValueError, match=rf"^distill: the student's vocabulary must cover the tokenizer's {len(tok)} tokens"
    ):
        check_vocabularies(student, make_model("llama", len(tok) - 2), tok)


def test_recipe_unknown_model_path_is_an_error_naming_it(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from ddk.engine.models import load_models

    root, cfg = recipe
    missing = str(tmp_path / "no-such-teacher")
    with pytest.raises(
        ValueError,
        match=rf"^distill: --teacher must be a folder written by save_pretrained or a hub id 'org/name'; "
        rf"got '{missing}', which is no folder \(looked in .*\), nor a hub id 'org/name'\. Check the path\.",
    ):
        load_models(dataclasses.replace(cfg, teacher=missing), torch.device("cpu"))


@pytest.mark.parametrize("name", ["llama-teachr", "models/no/such", "./nope"])
def test_a_model_argument_that_is_no_folder_and_no_hub_id_fails_at_once_naming_the_flag(
    tmp_path, monkeypatch, name
) -> None:  # type: ignore[no-untyped-def]
    """A typo such as ``--teacher llama-teachr`` (no such folder, not ``org/name``) fails before any
    network call, naming the flag the user typed; so does any non-folder with ``HF_HUB_OFFLINE=1``."""
    import transformers

    from ddk.engine.models import load_pretrained

    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: called.append(a))
    with pytest.raises(ValueError, match=rf"--teacher must be a folder .* got '{name}', which is no folder"):
        load_pretrained("teacher", name, flag="--teacher")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set, so only local folders load"):
        load_pretrained("teacher", "org/name", flag="--teacher")
    assert called == []  # nothing reached transformers (or the network)


def test_save_student_never_replaces_a_student_with_nonfinite_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from hf_models import make_model, make_tokenizer

    from ddk.engine.models import save_student

    tok = make_tokenizer(tmp_path / "tok")
    model = make_model("llama", len(tok))
    save_student(model.state_dict(), model, tok, tmp_path)
    before = (tmp_path / "student" / "model.safetensors").read_bytes()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    next(v for v in state.values() if v.is_floating_point())[0] = float("nan")
    with pytest.raises(ValueError, match=r"weights must be finite .* got NaN/inf in \['model\.embed_tokens\.weight'\]"):
        save_student(state, model, tok, tmp_path)
    assert (tmp_path / "student" / "model.safetensors").read_bytes() == before
