"""Tests of ddk/engine/config.py (``RunConfig``): the ``NAME=FILE`` record sources and the options a teacher cache leaves unused."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddk.engine.config import RunConfig, data_source


def test_data_source_name_equals_file_and_paths_holding_equals(tmp_path: Path) -> None:
    assert data_source("code=data/code.jsonl") == ("code", "data/code.jsonl")
    assert data_source("code=a=b.jsonl") == ("code", "a=b.jsonl")
    assert data_source("data/all.jsonl") == "data/all.jsonl"
    assert data_source("data/lang=en/part.parquet") == "data/lang=en/part.parquet"  # a Hive-style folder
    existing = tmp_path / "x=1.jsonl"
    existing.write_text("")
    assert data_source(str(existing)) == str(existing)


def test_run_config_named_sources_are_made_absolute_and_must_name_both(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code.jsonl").write_text("")
    (tmp_path / "all.jsonl").write_text("")
    cfg = RunConfig(
        teacher="t", student="s", data=("code=code.jsonl", "all.jsonl"), test_data=("code=code.jsonl",)
    ).validate()
    assert cfg.data == (f"code={tmp_path / 'code.jsonl'}", str(tmp_path / "all.jsonl"))
    assert cfg.test_data == (f"code={tmp_path / 'code.jsonl'}",)
    for bad in ("=code.jsonl", "code="):
        with pytest.raises(ValueError) as info:
            RunConfig(teacher="t", student="s", data=(bad,)).validate()
        assert str(info.value) == (
            f"RunConfig: data entries of the form NAME=FILE must name a domain and a file; got {bad!r}."
        )
    with pytest.raises(ValueError, match=r"out must be a folder apart from the inputs; got out=.* data\[0\]="):
        RunConfig(teacher="t", student="s", data=(f"code={tmp_path}",), out=str(tmp_path / "run")).validate()


@pytest.mark.parametrize(
    "option, value",
    [
        ("validation_data", ("v.jsonl",)),
        ("domain_field", "label"),
        ("text_field", "body"),
        ("skip_bad_records", True),
        ("max_record_mb", 1.0),
    ],
)
def test_run_config_record_options_with_a_teacher_cache_are_an_error(option: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(student="s", teacher_cache="tc", **{option: value}).validate()  # type: ignore[arg-type]
    shown = repr(list(value)) if isinstance(value, tuple) else repr(value)
    assert str(info.value).startswith(
        f"RunConfig: {option} must be left out with teacher_cache (the cache holds the sequences and the validation "
        f"sets it was built from; no record is read); got {option}={shown}. Drop --{option.replace('_', '-')}"
    )


def test_run_config_teacher_offload_without_fsdp_is_an_error_naming_the_torchrun_command() -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(teacher="t", student="s", data=("d.jsonl",), teacher_offload="cpu").validate("distill")
    assert str(info.value) == (
        "distill: teacher_offload 'cpu' must run with fsdp (FSDP2 keeps the teacher's shards in host memory and "
        "copies each block to the device for its forward); got fsdp=False. Launch with `torchrun "
        "--nproc_per_node=R -m ddk.recipes.cli distill --fsdp --teacher-offload cpu ...` (--nproc_per_node=1 on "
        "one GPU), or drop --teacher-offload."
    )
    cfg = RunConfig(teacher="t", student="s", data=("d.jsonl",), fsdp=True, teacher_offload="cpu").validate()
    assert cfg.teacher_offload == "cpu"


def test_run_config_teacher_offload_without_a_teacher_model_is_an_error_naming_the_conflict() -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(student="s", teacher_cache="tc", fsdp=True, teacher_offload="cpu").validate()
    assert str(info.value) == (
        "RunConfig: teacher_offload must be 'none' with teacher_cache (the cache replaces the teacher: no teacher "
        "model is loaded, so none is offloaded); got teacher_offload='cpu' with teacher_cache='tc'. Drop "
        "--teacher-offload, or distill from --teacher and --data."
    )
    with pytest.raises(ValueError) as info:
        RunConfig(student="s", data=("d.jsonl",), method="cpt", fsdp=True, teacher_offload="cpu").validate()
    assert str(info.value) == (
        "RunConfig: teacher_offload 'cpu' must have a teacher model to offload (--teacher); got none (method 'cpt' "
        "without a teacher). Drop --teacher-offload."
    )


def test_run_config_teacher_offload_other_than_none_or_cpu_is_an_error() -> None:
    from ddk.engine.config import coerce_field

    with pytest.raises(ValueError) as info:
        RunConfig(teacher_offload="gpu").validate()  # type: ignore[arg-type]
    assert str(info.value) == "RunConfig: teacher_offload must be one of ('none', 'cpu'); got 'gpu'."
    with pytest.raises(ValueError) as info:  # a YAML or config.json value
        coerce_field(RunConfig, "teacher_offload", True)
    assert str(info.value) == "RunConfig: teacher_offload must be one of ('none', 'cpu'); got True."
    assert coerce_field(RunConfig, "teacher_offload", "cpu") == "cpu"
