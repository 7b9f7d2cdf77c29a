"""Tests of ddk/recipes/options.py: each command's flags in groups, and the errors for another command's options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ddk.recipes.cli import build_parser
from ddk.recipes.config import RecipeConfig, config_from_args
from ddk.recipes.options import COMMANDS, DEMO_ONLY, SIDES, USER_ONLY, command_fields, flag_of


def _help(command: str) -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[command].format_help()  # type: ignore[attr-defined]


def _config(argv: list[str], base: tuple[str, ...] = ()) -> RecipeConfig:
    return config_from_args(build_parser().parse_args(argv), base, command=argv[0])


def test_options_every_field_belongs_to_a_command_and_to_one_side() -> None:
    fields = {f.name for f in dataclasses.fields(RecipeConfig)}
    for command in COMMANDS:
        names = command_fields(command)
        assert len(names) == len(set(names)) and set(names) <= fields, command
        other = DEMO_ONLY if SIDES[command] == "user" else USER_ONLY
        assert not set(names) & other, command
    assert set().union(*(command_fields(c) for c in COMMANDS)) == fields
    assert len(DEMO_ONLY) == 26 and not DEMO_ONLY & USER_ONLY


def test_options_distill_help_is_grouped_and_holds_no_demo_option() -> None:
    text = _help("distill")
    for title in ("models:", "data:", "method:", "optimisation:", "devices and processes:", "logging:"):
        assert f"\n{title}\n" in text, title
    assert "run folder and checkpoints:" in text
    for name in DEMO_ONLY:
        assert flag_of(name) not in text, name
    assert "--top-k" not in text and "--teacher-hidden" in _help("demo-real") and "--top-k" in _help("teacher-cache")
    assert "--student " not in _help("demo-real") and "--data " not in _help("teacher")


@pytest.mark.parametrize(
    "argv, flag, owners",
    [
        (["distill", "--teacher-hidden", "128"], "--teacher-hidden", "`ddk teacher` and `ddk demo-real`"),
        (["distill", "--user-folder", "notes=docs"], "--user-folder", "`ddk teacher` and `ddk demo-real`"),
        (["distill", "--no-offline"], "--offline", "`ddk teacher` and `ddk demo-real`"),
        (
            ["distill", "--student-start", "skewed", "--steps", "3"],
            "--student-start",
            "`ddk teacher` and `ddk demo-real`",
        ),
        (["teacher-cache", "--vocab-size", "512"], "--vocab-size", "`ddk teacher` and `ddk demo-real`"),
        (["distill", "--top-k", "8"], "--top-k", "`ddk teacher-cache`"),
        (["demo-real", "--student", "s"], "--student", "`ddk distill`"),
        (["demo-real", "--method", "kd"], "--method", "`ddk distill`"),
        (["teacher-cache", "--steps", "3"], "--steps", "`ddk distill` and `ddk demo-real`"),
    ],
)
def test_options_another_commands_flag_is_an_error_naming_where_it_belongs(
    argv: list[str], flag: str, owners: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"ddk {argv[0]}: error: {flag} is an option of {owners}, not of `ddk {argv[0]}`: " in err, err


def test_options_demo_flags_still_reach_the_demo_commands() -> None:
    cfg = _config(["demo-real", "--teacher-hidden", "96", "--user-folder", "notes=docs", "--no-offline"], ("demo",))
    assert (cfg.teacher_hidden, cfg.user_folders, cfg.offline, cfg.max_chars) == (96, {"notes": "docs"}, False, 300000)
    assert _config(["teacher", "--student-start", "skewed", "--scarce-share", "0.2"]).scarce_share == 0.2


def test_options_config_file_of_the_other_side_is_an_error_unless_at_its_default(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    own = tmp_path / "own.yaml"
    own.write_text("steps: 5\nvocab_size: 512\n")
    with pytest.raises(ValueError) as info:
        _config(["distill", "--config", str(own)])
    assert str(info.value).startswith(
        f"distill: vocab_size in the config file {str(own)!r} must be left out (or at its default 4096); got 512, an "
        "option of `ddk teacher` and `ddk demo-real`, not of `ddk distill`"
    )
    assert str(info.value).endswith("Remove it from the file.")
    assert _config(["teacher", "--config", str(own)]).vocab_size == 512  # the demo's side reads it
    full = tmp_path / "full.yaml"  # every option written out (a run's config.json): defaults pass
    full.write_text(yaml.safe_dump(RecipeConfig(steps=7, top_k=8).to_dict()))
    assert _config(["distill", "--config", str(full)]).steps == 7
    assert _config(["teacher-cache", "--config", str(full)]).top_k == 8  # a file shared by distill and teacher-cache
    demo = tmp_path / "demo.yaml"
    demo.write_text("teacher: my-teacher\n")
    with pytest.raises(ValueError, match=r"^demo-real: teacher in the config file .* got 'my-teacher', an option of "):
        _config(["demo-real", "--config", str(demo)])
    with pytest.raises(ValueError, match=r"^distill: max_chars in the config file 'demo' must be left out"):
        _config(["distill", "--config", "demo"])  # the demo's preset belongs to ddk demo-real


def test_options_method_option_the_method_has_no_use_for_is_an_error() -> None:
    with pytest.raises(ValueError) as info:
        _config(["distill", "--method", "kd", "--alpha", "0.3"])
    assert str(info.value) == (
        "distill: alpha (--alpha) must be left at its default 0.5 with method kd: only the DDK methods (ddk, "
        "ddk-no-smoothing, ddk-online) use it; got 0.3. Drop it, or choose a method that uses it."
    )
    with pytest.raises(
        ValueError, match=r"^distill: beta \(--beta\) must be left at its default 0.5 with method ddk: "
    ):
        _config(["distill", "--beta", "0.2"])
    with pytest.raises(ValueError, match=r"^distill: gamma \(--gamma\) .* with method cpt: only the methods with a"):
        _config(["distill", "--method", "cpt", "--gamma", "0.5"])
    with pytest.raises(ValueError, match=r"^demo-real: doremi_step_size .* with methods kd and ddk: only kd-doremi"):
        _config(["demo-real", "--doremi-step-size", "2"], ("demo",))
    assert _config(["distill", "--divergence", "jsd", "--beta", "0.2", "--ddk-init", "floored"]).beta == 0.2
    assert _config(["distill", "--method", "kd-doremi", "--doremi-smoothing", "0.01"]).doremi_smoothing == 0.01
    assert _config(["demo-real", "--alpha", "0.2"], ("demo",)).alpha == 0.2  # its ddk run uses it


def test_options_teacher_offload_is_a_processes_flag_and_without_fsdp_an_error_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ddk.recipes.cli import main

    text = _help("distill")
    section = text[text.index("\ndevices and processes:\n") : text.index("\nrun folder and checkpoints:\n")]
    assert "--teacher-offload {none,cpu}" in section and "(default: 'none')" in section
    assert _config(["distill", "--fsdp", "--teacher-offload", "cpu"]).teacher_offload == "cpu"
    assert main(["distill", "--teacher-offload", "cpu"]) == 2  # before anything is loaded or built
    err = capsys.readouterr().err
    assert err.startswith("ddk distill: error: RecipeConfig: teacher_offload 'cpu' must run with fsdp "), err
    assert "`torchrun --nproc_per_node=R -m ddk.recipes.cli distill --fsdp --teacher-offload cpu ...`" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--teacher-offload", "gpu"])
    assert "argument --teacher-offload: invalid choice: 'gpu' (choose from 'none', 'cpu')" in capsys.readouterr().err
