from __future__ import annotations

import json
import re
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


def test_atomic_write_text_with_concurrent_writers_never_tears(tmp_path: Path) -> None:
    import threading

    p = tmp_path / "state.json"
    payloads = [json.dumps({"writer": i, "pad": str(i) * 200_000}) for i in range(4)]
    p.write_text(payloads[0])
    errors: list[BaseException] = []
    torn: list[int] = []
    stop = threading.Event()

    def write(text: str) -> None:
        try:
            for _ in range(40):
                atomic_write_text(p, text)
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        while not stop.is_set():
            if p.read_text(encoding="utf-8") not in payloads:
                torn.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(t,)) for t in payloads]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert errors == [] and torn == []
    assert sorted(q.name for q in tmp_path.iterdir()) == ["state.json"]  # unique temporaries, all renamed


def test_safe_name_and_child_path_keep_paths_inside_their_folder(tmp_path: Path) -> None:
    import pytest

    from ddk._io import child_path, safe_name

    assert safe_name("f", "domain", "wiki de-1.x") == "wiki de-1.x"
    for bad, why in [
        ("a/x", "not contain '/'"),
        ("..", "not be '.' or '..'"),
        (".x", "not start with '.'"),
        ("a\\b", "not contain '\\\\'"),
        ("", "be a non-empty string"),
        ("a\nb", "not contain control"),
    ]:
        with pytest.raises(ValueError, match="^" + re.escape(f"f: domain must {why}")):
            safe_name("f", "domain", bad)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match=r"f: domain must name a path inside .*; got 'link'"):
        child_path("f", "domain", tmp_path, "link")
    assert child_path("f", "domain", tmp_path, "ok") == tmp_path / "ok"


def test_folder_lock_is_reentrant_in_a_process_and_writes_its_pid(tmp_path: Path) -> None:
    import os

    from ddk._io import folder_lock

    with folder_lock(tmp_path / "run", "f", "out"):
        with folder_lock(tmp_path / "run", "f", "out"):  # the demo locks, then distill does
            pass
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())
    with folder_lock(tmp_path / "run", "f", "out"):  # released
        pass
