"""Tests of ddk/engine/models.py: loading the teacher and student of a run and checking their
vocabularies, on the tiny models of ``recipe_cases`` (the ``recipe`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_recipe_teacher_with_another_tokenizer_is_an_error_naming_what_differs(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from hf_models import make_model, make_tokenizer

    from ddk.engine.models import load_models

    root, cfg = recipe
    other = tmp_path / "teacher"
    tok = make_tokenizer(tmp_path / "tok", vocab_size=310)  # another tokenizer, larger: not padding
    make_model("llama", len(tok) + 40).save_pretrained(str(other))
    tok.save_pretrained(str(other))
    with pytest.raises(ValueError) as info:
        load_models(dataclasses.replace(cfg, teacher=str(other)), torch.device("cpu"))
    msg = str(info.value)
    assert msg.startswith("distill: teacher and student must tokenize identically (only padding rows ")
    assert f"got different vocabulary sizes (teacher {len(tok)}, student 300); different ids of the probe text" in msg
    assert f"Tokenizers: teacher TokenizersBackend from '{other}', student TokenizersBackend from " in msg


def test_recipe_one_tokenizer_json_as_two_classes_with_other_ids_is_an_error(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The teacher folder holds the student's own ``tokenizer.json`` but a ``tokenizer_config.json``
    that loads it as GPT2Tokenizer with a prefix space: the same vocabulary, other ids; refused."""
    import dataclasses
    import json
    import shutil

    from ddk.engine.models import load_models

    root, cfg = recipe
    other = tmp_path / "teacher2"
    shutil.copytree(cfg.teacher, other)
    conf = json.loads((other / "tokenizer_config.json").read_text())
    conf.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=True)
    (other / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(
        ValueError, match=r"different ids of the probe text from token 0 on .* teacher GPT2Tokenizer from"
    ):
        load_models(dataclasses.replace(cfg, teacher=str(other)), torch.device("cpu"))


def test_recipe_teacher_vocabulary_narrower_is_an_error_wider_is_sliced(recipe) -> None:  # type: ignore[no-untyped-def]
    from hf_models import make_model
    from transformers import AutoTokenizer

    from ddk.engine.models import check_vocabularies

    root, cfg = recipe
    tok = AutoTokenizer.from_pretrained(cfg.student)
    student = make_model("llama", len(tok))
    with pytest.raises(
        ValueError,
        match=rf"^distill: the teacher's vocabulary must cover the student's {len(tok)} rows \(the student\) \(a "
        rf"teacher wider by padding rows is sliced\); got {len(tok) - 1} rows in the teacher\.",
    ):
        check_vocabularies(make_model("llama", len(tok) - 1), student, tok)
    with pytest.warns(UserWarning, match=r"teacher's 308 output rows exceed the student's 300; .* went unchecked"):
        check_vocabularies(make_model("llama", len(tok) + 8), student, tok)  # no tokenizer beside the teacher
    check_vocabularies(make_model("llama", len(tok) + 8), student, tok, teacher_tokenizer=tok)
    with pytest.raises(
        ValueError, match=rf"^distill: the student's vocabulary must cover the tokenizer's {len(tok)} tokens"
    ):
        check_vocabularies(student, make_model("llama", len(tok) - 2), tok)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_seq_len_above_a_position_limit_fails_before_packing_naming_both_limits(tmp_path: Path, family: str) -> None:
    """GPT-2 with 256 positions would die in an IndexError, Llama (RoPE) run silently; both refused."""
    from recipe_cases import own_cfg

    from ddk.engine.loop import distill

    cfg = own_cfg(tmp_path, family, seq_len=512)
    with pytest.raises(ValueError) as info:
        distill(cfg)
    msg = str(info.value)
    assert msg.startswith(
        "distill: --seq-len must be at most the models' position limits (max_position_embeddings, n_positions); "
        f"got 512, with the student '{cfg.student}' 256, the teacher '{cfg.teacher}' 256. Pass --seq-len 256 or less."
    )
    assert not (tmp_path / "cache" / "packed").exists()  # nothing tokenized


def test_a_student_larger_than_the_teacher_is_a_warning(recipe) -> None:  # type: ignore[no-untyped-def]
    import warnings

    from hf_models import make_model

    from ddk.engine.models import warn_larger_student

    small, large = make_model("llama", 300), make_model("llama", 300, hidden=64, layers=2)
    with pytest.warns(UserWarning, match=r"^distill: the student has more parameters \([\d,]+\) than the teacher"):
        warn_larger_student(small, large)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_larger_student(large, small)


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


def test_a_signal_while_a_model_loads_is_not_wrapped_as_a_load_error(recipe, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM during ``from_pretrained`` raises ``Preempted`` there: it must reach the CLI (exit 75),
    not become "loading ... failed" (exit 2)."""
    import transformers

    from ddk.engine.models import load_pretrained
    from ddk.engine.preempt import Preempted

    root, cfg = recipe

    def stopped(*a, **k):  # type: ignore[no-untyped-def]
        raise Preempted("SIGTERM", -1, "", stage="start-up")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stopped)
    with pytest.raises(Preempted):
        load_pretrained("student", cfg.student, flag="--student")
    assert not issubclass(Preempted, Exception)  # no `except Exception` anywhere can swallow it


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_load_models_teacher_offload_cpu_leaves_the_teacher_in_host_memory(recipe, offload: str) -> None:  # type: ignore[no-untyped-def]
    """With ``teacher_offload="cpu"`` the teacher stays in host memory for FSDP2 to shard (the meta
    device stands in for the GPU: the student goes there, the teacher does not), in the dtype of
    a run on that device; without, both go to the device."""
    import dataclasses

    from ddk.engine.models import load_models, teacher_place

    _, cfg = recipe
    cfg = dataclasses.replace(cfg, fsdp=True, teacher_offload=offload, dtype="bf16").validate()
    meta = torch.device("meta")
    teacher, student, _ = load_models(cfg, meta)
    want = "cpu" if offload == "cpu" else "meta"
    assert teacher_place(cfg, meta).type == want
    assert {p.device.type for p in teacher.parameters()} == {want}
    assert {p.device.type for p in student.parameters()} == {"meta"}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in teacher.parameters())
