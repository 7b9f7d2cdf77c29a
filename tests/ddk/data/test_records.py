"""Tests of ``ddk.data.records.load_records`` on local files in tmp_path (no hub access)."""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hf_models import write_jsonl

from ddk import DomainPartitioner
from ddk.data.records import load_records


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _as_list(ds: datasets.Dataset) -> list[dict]:
    return [{"text": t, "domain": d} for t, d in zip(ds["text"], ds["domain"])]


def _write_csv(path: Path, recs: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(recs)
    return path


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, list[dict]]:
    path = write_jsonl(tmp_path / "c.jsonl", docs_per_domain=6, words=12)
    recs = _records(path)
    # Texts that stress the non-JSON formats: a comma, a quote, a tab-free newline.
    recs[0]["text"] = 'has, a comma and "quotes"\nand a second line'
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, recs


# ----------------------------------------------------------------------------- formats
def test_load_records_every_format_gives_the_same_records(tmp_path, corpus):
    path, recs = corpus
    expected = [{"text": r["text"], "domain": r["domain"]} for r in recs]
    with_extra = [dict(r, source=f"s{i}", n=i) for i, r in enumerate(recs)]  # extra fields are dropped

    (tmp_path / "a.json").write_text(json.dumps(with_extra, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in with_extra))
    pq.write_table(pa.Table.from_pylist(with_extra), tmp_path / "c.parquet")
    _write_csv(tmp_path / "c.csv", with_extra)
    _write_csv(tmp_path / "c.tsv", recs, delimiter="\t")
    datasets.Dataset.from_list(with_extra).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(recs), "test": datasets.Dataset.from_list(recs[:2])}
    ).save_to_disk(str(tmp_path / "saved_dict"))

    sources = [
        path,
        tmp_path / "a.json",
        tmp_path / "lines.json",
        tmp_path / "c.parquet",
        tmp_path / "c.csv",
        str(tmp_path / "c.tsv"),
        tmp_path / "saved",
        tmp_path / "saved_dict",
    ]
    for src in sources:
        ds = load_records(src, progress=False)
        assert isinstance(ds, datasets.Dataset), src
        assert ds.column_names == ["text", "domain"], src
        assert ds.features["text"].dtype == "string" and ds.features["domain"].dtype == "string", src
        assert _as_list(ds) == expected, src


def test_load_records_concatenates_files_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", docs_per_domain=2, seed=1)
    b = write_jsonl(tmp_path / "b.jsonl", docs_per_domain=3, seed=2, domains=("math",))
    ds = load_records([b, a], progress=False)
    assert _as_list(ds) == [{"text": r["text"], "domain": r["domain"]} for r in _records(b) + _records(a)]


def test_load_records_hub_name_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None):  # type: ignore[no-untyped-def]
        calls.append((name, split))
        return datasets.Dataset.from_list([{"text": "x y", "domain": "web", "url": "u"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_records("some-org/some-corpus", progress=False)
    assert calls == [("some-org/some-corpus", "train")]
    assert _as_list(ds) == [{"text": "x y", "domain": "web"}]


# ----------------------------------------------------------------------------- bad records
def test_load_records_missing_domain_raises_with_file_and_line(tmp_path, corpus):
    path, recs = corpus
    del recs[2]["domain"]
    del recs[4]["domain"]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError) as e:
        load_records(path, progress=False)
    msg = str(e.value)
    assert msg.startswith(
        "load_records: every record must have a str 'text' and a non-empty str 'domain', within the size cap; got 2 "
        "bad record(s)"
    )
    assert f"{path}:3: missing field 'domain'" in msg and f"{path}:5: missing field 'domain'" in msg
    assert "on_missing='skip'" in msg and "--skip-bad-records" in msg


def test_load_records_bad_records_cli_message_names_the_flags_and_the_name_file_form(tmp_path):
    import pickle

    from ddk.data.records import BadRecordsError

    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": f"x{i}"}) + "\n" for i in range(40)))  # no domain field
    with pytest.raises(BadRecordsError) as e:
        load_records(code, progress=False)
    cli = e.value.cli_message
    assert cli.splitlines()[1:] == [  # the count, the first few, and what to do: 8 lines, not 40
        *(f"  {code}:{i}: missing field 'domain'" for i in range(1, 6)),
        "  ... and 35 more",
        f"Give each file its domain with --data NAME=FILE (here: --data code={code}), or name the records' domain "
        "field with --domain-field (the records have the fields ['text']), or drop the bad records with "
        "--skip-bad-records.",
    ]
    assert "on_missing" not in cli and "got 40 bad record(s):" in cli
    assert "on_missing='skip'" in str(e.value)  # the API's message keeps the API's names
    again = pickle.loads(pickle.dumps(e.value))
    assert isinstance(again, BadRecordsError) and (str(again), again.cli_message) == (str(e.value), cli)
    # another bad record than a missing domain: no NAME=FILE advice
    code.write_text(
        json.dumps({"text": 3, "domain": "code"}) + "\n" + json.dumps({"text": "x", "domain": "code"}) + "\n"
    )
    with pytest.raises(BadRecordsError) as e:
        load_records(code, progress=False)
    assert e.value.cli_message.endswith("Fix them, or drop them with --skip-bad-records.")


def test_load_records_skip_drops_bad_records_with_one_warning(tmp_path, corpus):
    path, recs = corpus
    good = [{"text": r["text"], "domain": r["domain"]} for i, r in enumerate(recs) if i not in (1, 3, 5)]
    del recs[1]["domain"]
    recs[3]["domain"] = ""
    lines = [json.dumps(r) for r in recs]
    lines[5] = '{"text": "cut off'  # a corrupted line
    path.write_text("\n".join(lines) + "\n\n")  # blank lines are ignored
    other = write_jsonl(tmp_path / "other.jsonl", docs_per_domain=1, domains=("math",))
    bad_other = _records(other) + [{"text": "no domain"}]
    other.write_text("".join(json.dumps(r) + "\n" for r in bad_other))

    with pytest.raises(ValueError, match=r"got 4 bad record\(s\)"):
        load_records([path, other], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_records([path, other], on_missing="skip", progress=False)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert msg.startswith(f"load_records: skipped 4 bad record(s) ({path}: 3, {other}: 1)")
    assert f"{path}:4: the domain must be a non-empty str; got ''" in msg
    assert f"{path}:6: not a JSON line (JSONDecodeError" in msg
    assert _as_list(ds) == good + [{"text": r["text"], "domain": r["domain"]} for r in bad_other[:1]]


@pytest.mark.parametrize(
    "value, reason",
    [
        (3, "the domain must be a non-empty str; got 3"),
        (None, "the domain must be a non-empty str; got None"),
    ],
)
def test_load_records_non_string_domain_is_a_bad_record(tmp_path, value, reason):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a", "domain": "x"}) + "\n" + json.dumps({"text": "b", "domain": value}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{p}:2: {reason}")):
        load_records(p, progress=False)


def test_load_records_bad_text_and_non_object_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"domain": "x"}\n{"text": 5, "domain": "x"}\n[1, 2]\n{"text": "ok", "domain": "x"}\n')
    with pytest.raises(ValueError) as e:
        load_records(p, progress=False)
    msg = str(e.value)
    assert f"{p}:1: missing field 'text'" in msg
    assert f"{p}:2: field 'text' must be a str; got 5" in msg
    assert f"{p}:3: a record must be a JSON object; got list" in msg


def test_load_records_row_numbers_for_csv_and_parquet(tmp_path):
    recs = [{"text": "a", "domain": "x"}, {"text": "b", "domain": ""}, {"text": "c", "domain": "y"}]
    _write_csv(tmp_path / "c.csv", recs)
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'c.csv'}:row 2: the domain must be a non-empty str")):
        load_records(tmp_path / "c.csv", progress=False)
    with pytest.raises(ValueError) as e:
        load_records(tmp_path / "c.parquet", progress=False)
    assert f"{tmp_path / 'c.parquet'}:row 2: missing field 'domain'" in str(e.value) and "got 2 bad" in str(e.value)


def test_load_records_lists_only_the_first_few_bad_records(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(
        "".join(json.dumps({"text": str(i)}) + "\n" for i in range(12))
        + json.dumps({"text": "a", "domain": "x"})
        + "\n"
    )
    with pytest.raises(ValueError) as e:
        load_records(p, progress=False)
    msg = str(e.value)
    assert "got 12 bad record(s)" in msg and f"{p}:5:" in msg and f"{p}:6:" not in msg and "... and 7 more" in msg


# ----------------------------------------------------------------------------- partitioner / names
def test_load_records_partitioner_assigns_the_domain_from_another_field(tmp_path):
    recs = [{"text": f"t{i}", "source": f"pkg/f{i}.{'py' if i % 2 else 'md'}", "domain": "ignored"} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "c.parquet")
    part = DomainPartitioner.by_rules({"code": r"\.py$", "docs": r"\.md$"}, field="source")
    ds = load_records(tmp_path / "c.parquet", partitioner=part, progress=False)
    assert ds["domain"] == ["docs", "code"] * 3 and ds["text"] == [r["text"] for r in recs]

    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps(recs[0]) + "\n" + json.dumps({"text": "x", "source": "a.rs"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{p}:2: the partitioner cannot assign a domain")):
        load_records(p, partitioner=part, progress=False)


def test_load_records_other_field_names(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", docs_per_domain=2, domain_field="label", text_field="body")
    ds = load_records(p, text_field="body", domain_field="label", progress=False)
    assert ds.column_names == ["text", "domain"] and len(ds) == 6
    assert ds["text"] == [r["body"] for r in _records(p)]


@pytest.mark.parametrize(
    "name, problem",
    [
        ("a/b", "must not contain '/'"),
        ("a\\b", "must not contain '\\\\'"),
        ("a\x00b", "must not contain NUL"),
        (".", "must not be '.'"),
        ("..", "must not be '..'"),
    ],
)
def test_load_records_rejects_domain_names_that_cannot_name_files(tmp_path, name, problem):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a", "domain": "ok"}) + "\n" + json.dumps({"text": "b", "domain": name}) + "\n")
    for on_missing in ("raise", "skip"):  # never skipped: it is not a missing value
        with pytest.raises(ValueError) as e:
            load_records(p, on_missing=on_missing, progress=False)
        assert str(e.value).startswith(f"load_records: domain names {problem} (they become parts of file names)")
        assert f"got {name!r} at {p}:2" in str(e.value)


def test_load_records_domain_per_file_from_pairs_or_a_mapping_jsonl_and_parquet(tmp_path):
    """A ``(domain, path)`` source gives its domain to every record (no domain field needed, one
    present is not read); pairs mix with plain paths, whose records carry their domain."""
    code = [{"text": f"def f{i}(): pass"} for i in range(3)]
    prose = [{"text": f"she was {i}", "domain": "not-read"} for i in range(2)]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in code))
    pq.write_table(pa.Table.from_pylist(prose), tmp_path / "prose.parquet")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "x = 1", "domain": "math"}) + "\n")
    want = [
        *({"text": r["text"], "domain": "code"} for r in code),
        *({"text": r["text"], "domain": "prose"} for r in prose),
    ]
    by_map = load_records({"code": tmp_path / "code.jsonl", "prose": tmp_path / "prose.parquet"}, progress=False)
    assert _as_list(by_map) == want
    pairs = [("code", str(tmp_path / "code.jsonl")), mixed, ("prose", tmp_path / "prose.parquet")]
    assert _as_list(load_records(pairs, progress=False)) == [*want[:3], {"text": "x = 1", "domain": "math"}, *want[3:]]


def test_load_records_domain_per_file_errors(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{p}:2: missing field 'text'")):  # the text is still needed
        load_records([("code", p)], progress=False)
    with pytest.raises(
        ValueError,
        match=re.escape(f"load_records: a (domain, path) source must name its domain; got ('', {str(p)!r})."),
    ):
        load_records([("", str(p))], progress=False)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"load_records: domain names must not contain '/' (they become parts of file names); got 'a/b' at the domain of {str(p)!r}."
        ),
    ):
        load_records({"a/b": p}, progress=False)
    part = DomainPartitioner.by_rules({"code": r"a"}, field="text")
    with pytest.raises(
        ValueError, match=r"load_records: partitioner must not be combined with \(domain, path\) sources"
    ):
        load_records([("code", p)], partitioner=part, progress=False)
    with pytest.raises(TypeError, match=r"load_records: paths must be a path, a dataset name, a \(domain, path\) pair"):
        load_records([("code", p, "x")], progress=False)  # type: ignore[list-item]


# ----------------------------------------------------------------------------- bad arguments
def test_load_records_missing_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"load_records: paths must be existing files or folders (or a hub dataset name); got missing {str(missing)!r}."
        ),
    ):
        load_records([missing], progress=False)
    with pytest.raises(ValueError, match="got missing"):
        load_records("./data/nope", progress=False)  # an explicit relative path is never a hub name


def test_load_records_bad_arguments(tmp_path, corpus):
    path, _ = corpus
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match=r"load_records: paths must end in one of \['.jsonl'"):
        load_records(tmp_path / "c.txt", progress=False)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="load_records: a folder must be written by datasets.Dataset.save_to_disk"):
        load_records(tmp_path / "plain", progress=False)
    datasets.DatasetDict({"dev": datasets.Dataset.from_list([{"text": "a", "domain": "x"}])}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(
        ValueError, match=re.escape("load_records: a saved DatasetDict must have a 'train' split") + r".*\['dev'\]"
    ):
        load_records(tmp_path / "dd", progress=False)
    with pytest.raises(ValueError, match="load_records: on_missing must be 'raise' or 'skip'; got 'drop'."):
        load_records(path, on_missing="drop", progress=False)
    with pytest.raises(ValueError, match=re.escape("load_records: paths must name at least one source; got [].")):
        load_records([], progress=False)
    with pytest.raises(TypeError, match="load_records: paths must be a path"):
        load_records(3, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="load_records: partitioner must be a ddk.DomainPartitioner"):
        load_records(path, partitioner="domain", progress=False)  # type: ignore[arg-type]
    (tmp_path / "bad.json").write_text('[{"text": "a", "domain": "x"},')
    with pytest.raises(
        ValueError, match="load_records: a .json file must hold one JSON array of records or JSON lines"
    ):
        load_records(tmp_path / "bad.json", progress=False)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="load_records: paths must hold at least one valid record; got none"):
        load_records(tmp_path / "empty.jsonl", progress=False)


def test_load_records_reads_files_with_a_utf8_bom(tmp_path):
    recs = [{"text": "é a", "domain": "x"}, {"text": "b", "domain": "y"}]
    bom = "\ufeff"
    (tmp_path / "c.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    (tmp_path / "c.json").write_text(bom + json.dumps(recs), encoding="utf-8")
    _write_csv(tmp_path / "c.csv", recs)
    (tmp_path / "c.csv").write_text(bom + (tmp_path / "c.csv").read_text(encoding="utf-8"), encoding="utf-8")
    for name in ("c.jsonl", "c.json", "c.csv"):
        assert _as_list(load_records(tmp_path / name, progress=False)) == recs, name


# ----------------------------------------------------------------------------- through ddk distill
def test_recipe_record_without_domain_field_is_an_error_with_file_and_line_unless_skipped(
    recipe, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from ddk.recipes.distill import distill

    root, cfg = recipe
    src = tmp_path / "mine.jsonl"
    lines = Path(cfg.data[0]).read_text().splitlines()
    lines.insert(4, json.dumps({"text": "no domain here"}))
    src.write_text("\n".join(lines) + "\n")
    bad = dataclasses.replace(cfg, data=(str(src),), out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"{src}:5: "):
        distill(bad)
    with pytest.warns(UserWarning, match="1"):
        distill(dataclasses.replace(bad, skip_bad_records=True))
    assert (tmp_path / "run" / "student" / "config.json").is_file()


def test_load_records_with_other_field_names_lists_them_and_names_the_flags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json as _json

    path = tmp_path / "c.jsonl"
    path.write_text("".join(_json.dumps({"body": "x y", "source": "a"}) + "\n" for _ in range(5)))
    with pytest.raises(
        ValueError,
        match=r"(?s)missing field.*The records have the fields \['body', 'source'\]: .*--text-field and --domain-field",
    ):
        load_records([str(path)], progress=False)
    assert len(load_records([str(path)], text_field="body", domain_field="source", progress=False)) == 5


def test_load_records_record_over_the_cap_is_a_bad_record_named_by_file_and_line(tmp_path):
    cap = 1000
    small = [{"domain": "a", "text": "short"}, {"domain": "b", "text": "also short"}]
    big = {"domain": "a", "text": "x" * 5000}
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in (small[0], big, small[1])))
    reason = f"a record must be at most {cap} bytes (max_record_bytes; CLI flag --max-record-mb)"
    with pytest.raises(ValueError, match=re.escape(f"{jl}:2: {reason}; got {len(json.dumps(big))} bytes")):
        load_records(jl, max_record_bytes=cap, progress=False)
    with pytest.warns(UserWarning, match=re.escape(f"skipped 1 bad record(s) ({jl}: 1)")):
        ds = load_records(jl, max_record_bytes=cap, on_missing="skip", progress=False)
    assert _as_list(ds) == small
    assert len(load_records(jl, progress=False)) == 3  # under the default cap (32 MiB)
    csv_path = _write_csv(tmp_path / "c.csv", [small[0], big, small[1]])
    with pytest.raises(ValueError, match=re.escape(f"{csv_path}:line 3: {reason}")):  # line 1 is the header
        load_records(csv_path, max_record_bytes=cap, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        assert _as_list(load_records(csv_path, max_record_bytes=cap, on_missing="skip", progress=False)) == small
    pq.write_table(pa.Table.from_pylist([small[0], big, small[1]]), tmp_path / "c.parquet")
    with pytest.warns(UserWarning, match=re.escape(f"{tmp_path / 'c.parquet'}:row 2: {reason}")):
        ds = load_records(tmp_path / "c.parquet", max_record_bytes=cap, on_missing="skip", progress=False)
    assert _as_list(ds) == small
    (tmp_path / "c.json").write_text(json.dumps([small[0], big, small[1]]))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'c.json'}:row 2: {reason}")):
        load_records(tmp_path / "c.json", max_record_bytes=cap, progress=False)
    with pytest.raises(ValueError, match=re.escape("load_records: max_record_bytes must be an int >= 1; got 0.")):
        load_records(jl, max_record_bytes=0, progress=False)


def test_load_records_50_mb_line_costs_memory_near_the_cap_not_its_size(tmp_path):
    """A 50 MB JSONL line under a 1 MiB cap: refused as file:line, the process growing by a few MiB
    (it grew by about 300 MB reading the whole line, and the default cap is 32 MiB)."""
    import subprocess
    import sys

    from recipe_cases import child_env

    path = tmp_path / "big.jsonl"
    record = '{"domain": "a", "text": "' + "x" * (50 << 20) + '"}'
    with path.open("w") as f:
        f.write(json.dumps({"domain": "a", "text": "ok"}) + "\n" + record + "\n")
    script = (
        "import resource, sys, datasets, pyarrow\n"
        "from ddk.data.records import load_records\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_records(sys.argv[1], max_record_bytes=1 << 20, progress=False)\n"
        "except ValueError as e:\n"
        "    print(str(e).splitlines()[1])\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"  # ru_maxrss: KiB on Linux
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    line, grew = res.stdout.splitlines()
    assert line.startswith(f"  {path}:2: a record must be at most 1048576 bytes") and line.endswith(
        f"got {len(record)} bytes"
    )
    assert int(grew) <= 8 << 20, f"reading grew the process by {int(grew) >> 20} MiB"


# ----------------------------------------------------------------------------- RecordStream
def test_record_stream_batches_are_bounded_and_equal_load_records(tmp_path):
    from ddk.data.records import RecordStream

    path = write_jsonl(tmp_path / "c.jsonl", docs_per_domain=30, words=12)
    stream = RecordStream(path, progress=False)
    sizes = [(len(t), sum(map(len, t))) for t, _ in stream.batches(max_records=7, max_chars=400)]
    assert all(n <= 7 for n, _ in sizes) and sum(n for n, _ in sizes) == 90 == stream.records
    assert all(chars < 400 + 12 * 10 for _, chars in sizes)  # the batch ends at the record that crosses it
    texts = [t for ts, _ in stream.batches(max_records=7) for t in ts]
    assert texts == load_records(path, progress=False)["text"]


def test_record_stream_fingerprint_follows_the_files(tmp_path, corpus):
    import os

    from ddk.data.records import RecordStream

    path, _ = corpus
    first = RecordStream([("code", path)], progress=False).fingerprint()
    assert first == RecordStream([("code", path)], progress=False).fingerprint()
    assert first != RecordStream([("math", path)], progress=False).fingerprint()  # the domain of a pair counts
    assert first != RecordStream([("code", path)], max_record_bytes=100, progress=False).fingerprint()
    contents = RecordStream([("code", path)], progress=False).fingerprint("contents")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert first != RecordStream([("code", path)], progress=False).fingerprint()
    assert contents == RecordStream([("code", path)], progress=False).fingerprint("contents")  # the same bytes
    path.write_text(path.read_text() + "\n")
    assert contents != RecordStream([("code", path)], progress=False).fingerprint("contents")
    part = DomainPartitioner.by_field("domain")
    assert RecordStream(path, partitioner=part, progress=False).fingerprint() is None  # a function: unknowable
    assert RecordStream("org/name", progress=False).fingerprint() is None  # a hub dataset


def test_record_stream_failing_turns_true_at_the_first_bad_record(tmp_path, corpus):
    from ddk.data.records import RecordStream

    path, recs = corpus
    del recs[3]["domain"]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    stream = RecordStream(path, progress=False)
    seen = []
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: missing field 'domain'")):
        for texts, _ in stream.batches(max_records=2):
            seen.append((len(texts), stream.failing))
    assert seen[0] == (2, False) and seen[-1][1] is True and sum(n for n, _ in seen) == len(recs) - 1
    skip = RecordStream(path, on_missing="skip", progress=False)
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        list(skip.batches())
    assert not skip.failing
