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


# ---------------------------------------------------------------------------- no write through a link
def _outside(tmp_path: Path) -> Path:
    """A file outside the folder ddk writes in, which a link there points at."""
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_text("keep me\n")
    return target


def test_open_nofollow_refuses_a_link_naming_it_and_leaves_the_target(tmp_path: Path) -> None:
    import pytest

    from ddk._io import append_line, open_nofollow

    target = _outside(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.jsonl").symlink_to(target)
    (folder / "dangling.jsonl").symlink_to(tmp_path / "outside" / "new.txt")
    for mode in ("a", "w", "wb"):
        with pytest.raises(
            ValueError, match=rf"^f: {re.escape(str(folder / 'log.jsonl'))} must not be a symbolic link"
        ):
            open_nofollow(folder / "log.jsonl", mode, fn="f")
    with pytest.raises(ValueError, match=r"dangling\.jsonl must not be a symbolic link .*got a link to '.*new\.txt'"):
        append_line(folder / "dangling.jsonl", "{}", fn="f")
    assert target.read_text() == "keep me\n" and not (tmp_path / "outside" / "new.txt").exists()
    append_line(folder / "plain.jsonl", '{"a": 1}')
    append_line(folder / "plain.jsonl", '{"a": 2}')
    assert (folder / "plain.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'


def test_atomic_write_and_fresh_dir_refuse_a_link_naming_it(tmp_path: Path) -> None:
    import pytest

    from ddk._io import atomic_write_bytes, fresh_dir

    target = _outside(tmp_path)
    (tmp_path / "weights.png").symlink_to(target)
    with pytest.raises(ValueError, match=r"atomic_write: .*weights\.png must not be a symbolic link"):
        atomic_write_bytes(tmp_path / "weights.png", b"png")
    (tmp_path / ".student.tmp-1").symlink_to(target.parent, target_is_directory=True)
    with pytest.raises(ValueError, match=r"save_student: .*\.student\.tmp-1 must not be a symbolic link"):
        fresh_dir(tmp_path / ".student.tmp-1", "save_student")
    assert target.read_text() == "keep me\n" and sorted(p.name for p in target.parent.iterdir()) == ["precious.txt"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("stale")
    assert list(fresh_dir(tmp_path / "old").iterdir()) == []


def test_folder_lock_refuses_a_lock_link_and_leaves_its_target(tmp_path: Path) -> None:
    import pytest

    from ddk._io import folder_lock

    target = _outside(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(target)
    with pytest.raises(ValueError, match=r"^distill: .*/run/\.lock must not be a symbolic link"):
        with folder_lock(tmp_path / "run", "distill", "out"):
            pass
    assert target.read_text() == "keep me\n"  # was truncated to the pid


def test_disk_full_message_names_the_folder_and_the_fix() -> None:
    import errno

    from ddk._io import disk_full_message, is_disk_full

    exc = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(exc) and not is_disk_full(OSError(errno.EACCES, "denied")) and not is_disk_full(ValueError())
    assert disk_full_message("f", "out", "/x/y", exc, then="all kept.") == (
        "f: out must be on a disk with free space; got no space left while writing '/x/y' (OSError: [Errno 28] "
        "No space left on device). Free space (or pass another out) and rerun the same command: all kept."
    )


def test_printable_escapes_control_characters_only() -> None:
    from ddk._io import printable

    assert printable("wiki dé-1") == "wiki dé-1"
    assert printable("a\x1b[2Jb") == "'a\\x1b[2Jb'" and printable("a\tb\n") == "'a\\tb\\n'"


# ---------------------------------------------------------------------------- bounded JSON reads
def test_read_json_reads_what_json_dumps_wrote(tmp_path: Path) -> None:
    from ddk._io import json_depth, read_json

    value = {"a": [1, 2.5, None, {"b": '[{not a bracket \\ "]}'}], "c": "ä"}
    (tmp_path / "x.json").write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    assert read_json(tmp_path / "x.json") == value
    assert json_depth(json.dumps(value)) == 3 and json_depth("3") == 0


def test_read_json_nested_900_deep_is_a_value_error_not_a_recursion_error(tmp_path: Path) -> None:
    import pytest

    from ddk._io import JSONLimitError, loads_json, read_json

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 900 + "]" * 900)
    with pytest.raises(
        JSONLimitError,
        match=rf"^ddk: {deep} must be JSON nested at most 64 deep; got 900 levels \(not a file ddk wrote",
    ):
        read_json(deep)
    assert issubclass(JSONLimitError, ValueError)
    assert loads_json("[" * 900 + "]" * 900, max_depth=1000) is not None  # a stated cap, not a fixed one
    with pytest.raises(ValueError, match=r"^f: line 3 must be JSON nested at most 2 deep; got 3 levels"):
        loads_json(b'{"a": [[1]]}', max_depth=2, where="line 3", fn="f")


def test_read_json_refuses_a_file_over_its_size_cap(tmp_path: Path) -> None:
    import pytest

    from ddk._io import JSONLimitError, read_json

    big = tmp_path / "state.json"
    big.write_text(json.dumps({"pad": "x" * 2000}))
    assert read_json(big, max_bytes=4096)["pad"] == "x" * 2000
    with pytest.raises(
        JSONLimitError, match=rf"^load: {big} must be a JSON file of at most 1000 bytes; got 2011 bytes"
    ):
        read_json(big, max_bytes=1000, fn="load")
