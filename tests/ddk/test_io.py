from __future__ import annotations

import json
from pathlib import Path

from ddk._io import atomic_write_text, json_fingerprint


def test_atomic_write_text_replaces_file_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    p.write_text("old")
    assert atomic_write_text(p, json.dumps({"ä": 1}, ensure_ascii=False)) == p
    assert json.loads(p.read_text(encoding="utf-8")) == {"ä": 1}
    assert sorted(q.name for q in tmp_path.iterdir()) == ["state.json"]


def test_json_fingerprint_ignores_key_order() -> None:
    assert json_fingerprint({"a": 1, "b": [1, 2]}) == json_fingerprint({"b": [1, 2], "a": 1})
    assert len(json_fingerprint({"a": 1})) == 16
    assert json_fingerprint({"a": 1}) != json_fingerprint({"a": 2})
