"""``bench/sizing.py``: the published models' parameter counts, the tables it prints, and that the
tables and figures of docs/guides/scale.md are the ones it computes now. (Not ``test_sizing.py``:
tests/ddk/engine/ has one, and two test modules may not share a name.)"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "guides" / "scale.md"
_spec = importlib.util.spec_from_file_location("sizing_script", ROOT / "bench" / "sizing.py")
assert _spec is not None and _spec.loader is not None
sizing = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sizing
_spec.loader.exec_module(sizing)

from ddk.engine.sizing import ModelShape, Workload  # noqa: E402


def test_published_configs_give_the_published_parameter_counts() -> None:
    counts = {name: ModelShape.from_config(c).parameters for name, c in sizing.published_configs().items()}
    assert counts == {
        "Qwen1.5-14B": 14_167_290_880,
        "Qwen1.5-1.8B": 1_836_828_672,
        "LLaMA2-13B": 13_015_864_320,  # the counts these models are published with
        "TinyLlama-1.1B": 1_100_048_384,
        "Llama-2-70B": 68_976_648_192,
    }


def test_sizing_script_prints_every_pair_and_placement(capsys: pytest.CaptureFixture[str]) -> None:
    assert sizing.main(["--gpus", "8", "--micro-batch", "1", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Workload: R = 8 GPUs, micro-batch 1 x 4096 tokens = 4,096 tokens per GPU")
    for t, s in sizing.PAIRS:
        rows = [line for line in out.splitlines() if line.startswith(f"| {t} -> {s} |")]
        assert len(rows) == 1 + len(sizing.PLACEMENT_NAMES)  # the FLOPs row and one row per placement
    assert out.count("204 B/token = 3.06 TB") == 3  # k = 32, 15B tokens


def test_docs_page_holds_the_current_tables_and_its_figures_come_from_them(tmp_path: Path) -> None:
    assert sizing.main(["--check", str(PAGE)]) == 0, "rerun: python bench/sizing.py --write docs/guides/scale.md"
    body = sizing.tables(Workload())
    prose = PAGE.read_text().split("### What the tables say")[1].split("###")[0]
    figures = re.findall(r"\b\d+\.\d+\b", prose)
    assert len(figures) >= 15
    missing = [f for f in figures if not re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", body)]
    assert missing == [], f"figures of the page that no table holds: {missing}"

    stale = tmp_path / "page.md"
    stale.write_text(PAGE.read_text().replace("| **61.9** |", "| **62.0** |"))
    assert sizing.main(["--check", str(stale)]) == 1
    assert sizing.main(["--write", str(stale)]) == 0 and stale.read_text() == PAGE.read_text()


def test_replace_between_needs_one_pair_of_markers() -> None:
    with pytest.raises(ValueError, match="one <!-- sizing-tables:begin --> ... <!-- sizing-tables:end --> pair"):
        sizing.replace_between("no markers", "x")
