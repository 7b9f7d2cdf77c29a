"""Tests of ddk/recipes/config.py: reading a YAML config and making one from overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddk.recipes.config import load_yaml, make_config


def test_config_yaml_unknown_key_is_named_with_the_valid_ones(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\nalpah: 0.3\n")
    with pytest.raises(ValueError) as info:
        load_yaml(p)
    msg = str(info.value)
    assert msg.startswith(f"load_config: keys of {p} must be config options; got unknown ['alpah'] (valid: [")
    assert "'alpha'" in msg and "'on_nonfinite'" in msg and "'skip_bad_lines'" in msg
    with pytest.raises(
        ValueError,
        match=r"^make_config: overrides must be config options; got unknown \['alpah'\] \(valid: \[.*'alpha'",
    ):
        make_config(alpah=0.3)


def test_ddk_signal_and_temperature_flags_reach_the_schedule(tmp_path: Path) -> None:
    import argparse

    from ddk.engine.components import build_components
    from ddk.recipes.config import add_config_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    ns = p.parse_args(["--ddk-signal", "gain", "--ddk-temperature", "2.5", "--ddk-init", "floored"])
    cfg = config_from_args(ns)
    assert (cfg.ddk_signal, cfg.ddk_temperature, cfg.ddk_init) == ("gain", 2.5, "floored")

    class _Data:
        names, sizes = ("a", "b"), (4, 4)

        def validation_batches(self, n):  # type: ignore[no-untyped-def]
            import torch

            return {d: [{"input_ids": torch.ones(1, 4, dtype=torch.long)}] for d in self.names}

        def train_dataset(self):  # type: ignore[no-untyped-def]
            return None

    parts = build_components(cfg, _Data(), global_batch_size=2, seed=0, eval_batch_size=2)
    sm = parts.controller.smoother
    assert (sm.signal, sm.temperature, sm.init) == ("gain", 2.5, "floored")
    with pytest.raises(SystemExit):
        p.parse_args(["--ddk-signal", "loss"])


def test_config_yaml_alias_bomb_deep_nesting_and_huge_file_are_errors_naming_it(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"  # 9^8 strings when expanded: an 800 MB message before
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefg", "bcdefgh")]
    bomb.write_text("\n".join(lines) + "\ndata: *h\n")
    with pytest.raises(ValueError, match=rf"^load_config: {bomb} must not use YAML aliases \(\*a, line 2\); write"):
        load_yaml(bomb)
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ValueError, match=rf"^load_config: {deep} must nest at most 16 levels; got more at line 1\."):
        load_yaml(deep)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20) + "\nsteps: 5\n")
    with pytest.raises(ValueError, match=rf"^load_config: {huge} must be at most 1048576 bytes \(a config file\); got"):
        load_yaml(huge)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ValueError, match=rf"^load_config: {bad} must be valid YAML; got"):
        load_yaml(bad)


def test_max_record_mb_flag_reaches_load_records_and_is_checked(tmp_path: Path) -> None:
    from ddk.recipes.cli import build_parser
    from ddk.recipes.config import config_from_args

    cfg = config_from_args(build_parser().parse_args(["distill", "--max-record-mb", "0.5"]))
    assert cfg.max_record_mb == 0.5 and cfg.max_record_bytes == 1 << 19
    assert make_config().max_record_bytes == 32 << 20
    with pytest.raises(ValueError, match=r"max_record_mb must be a number in \(0, 1048576\] \(MiB per record\); got 0"):
        make_config(max_record_mb=0)


@pytest.mark.parametrize("command", ["distill", "demo-real", "teacher", "teacher-cache"])
def test_help_shows_one_default_per_flag_and_none_for_an_empty_one(command: str, capsys) -> None:  # type: ignore[no-untyped-def]
    import re

    from ddk.recipes.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    entries = [e for e in re.split(r"\n(?=  -)", text.split("options:", 1)[1]) if e.strip()]  # one per flag
    twice = [e.split()[0] for e in entries if len(re.findall(r"\(default", e)) > 1]
    assert not twice, twice
    empty = [e.split()[0] for e in entries if re.search(r"\(default: (''|\(\)|None)\)", " ".join(e.split()))]
    assert not empty, empty
    if command == "distill":
        flat = {e.split()[0]: " ".join(e.split()) for e in entries}
        assert "(default" not in flat["--teacher"] and "(default" not in flat["--student"]
        assert flat["--out"].endswith("run folder (default: runs/real/<method>-s<seed>)")
        assert flat["--validation-data"].endswith("(default: a stable per-domain split of --data)")
        assert flat["--lr"].endswith("(default: 0.002)")
