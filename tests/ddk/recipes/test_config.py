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
