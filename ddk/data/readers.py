"""The readers of ``ddk.data.load_records`` (no public names): each source's rows, one at a time, as
``(location, record or why it is unreadable)``.

Formats, chosen by suffix: ``.jsonl`` / ``.json`` (JSON lines, or one JSON array of records),
``.parquet`` (read by row groups' batches), ``.csv``, ``.tsv``; a folder written by
``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``'s, whose ``"train"`` split is read); any
other string that is not a local path is a Hugging Face hub dataset name. Every reader holds one
record (or one batch of rows) at a time, and a record over the size cap is measured without being
kept: a JSONL or CSV line is read at most ``cap + 1`` bytes at a time, a Parquet batch's string
sizes are measured before its rows become Python objects. A ``.json`` array is parsed whole.

``fn`` names the public function in the messages (``load_records``, ``pack_files``).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__: list[str] = []

_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
_SHOW = 5  # bad records listed in an error or warning
_BATCH = 1000  # rows per batch read from parquet / datasets
MAX_RECORD_BYTES = 32 << 20  # default cap of one record (a JSONL line, a CSV line, a row's strings)
_SKIP = 1 << 20  # bytes read at a time while skipping the rest of an over-long line


class _Bad:
    """A record that could not be read (corrupted line); ``reason`` says why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Row = tuple[str, "Mapping[str, Any] | _Bad"]  # (location, record or why it is unreadable)


def _domain_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a domain name (it names files later), or ``None`` if it can."""
    if name in (".", ".."):
        return f"must not be {name!r}"
    for ch, label in (("/", "'/'"), ("\\", "'\\\\'"), ("\x00", "NUL")):
        if ch in name:
            return f"must not contain {label}"
    return None


def _check_domain_name(fn: str, name: str, where: str) -> None:
    """Raise the error for a domain name that cannot name a file (see ``_domain_name_problem``)."""
    problem = _domain_name_problem(name)
    if problem is not None:
        raise ValueError(
            f"{fn}: domain names {problem} (they become parts of file names); "
            f"got {name!r} at {where}. Rename the domain in the data, or assign names with "
            "partitioner=DomainPartitioner.by_function(...)."
        )


# ---------------------------------------------------------------------------- readers
def _too_big(cap: int, size: int | None = None) -> _Bad:
    got = f"got {size} bytes" if size is not None else "got a larger one"
    return _Bad(f"a record must be at most {cap} bytes (max_record_bytes; CLI flag --max-record-mb); {got}")


def _bounded_lines(f: Any, cap: int) -> Iterator[tuple[int, Any]]:
    """``(lineno, line)`` of a file opened in binary or text mode, each line read at most ``cap + 1``
    bytes (characters) at a time; a longer line is ``(lineno, its length)``, read in bounded
    pieces and not kept."""
    lineno = 0
    while True:
        raw = f.readline(cap + 1)
        if not raw:
            return
        lineno += 1
        nl = b"\n" if isinstance(raw, bytes) else "\n"
        if len(raw) > cap and not raw.endswith(nl):
            size = len(raw)
            del raw
            while True:  # the rest of the line, in bounded pieces
                piece = f.readline(_SKIP)
                size += len(piece)
                if not piece or piece.endswith(nl):
                    break
            yield lineno, size - 1 if piece else size  # the newline is not the record's
            continue
        yield lineno, raw


def _jsonl_rows(path: Path, cap: int) -> Iterator[Row]:
    with path.open("rb") as f:
        for lineno, raw in _bounded_lines(f, cap):
            where = f"{path}:{lineno}"
            if isinstance(raw, int):
                yield where, _too_big(cap, raw)
                continue
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                yield where, _Bad(f"not a JSON line ({type(e).__name__}: {e})")
                continue
            if not isinstance(rec, dict):
                yield where, _Bad(f"a record must be a JSON object; got {type(rec).__name__}")
                continue
            yield where, rec


def _json_rows(path: Path, cap: int, fn: str) -> Iterator[Row]:
    """A ``.json`` file: one JSON array of records if it starts with ``[``, else JSON lines."""
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_rows(path, cap)
        return
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{fn}: a .json file must hold one JSON array of records or JSON lines; "
            f"{path} starts with '[' but is not valid JSON ({type(e).__name__}: {e})."
        ) from None
    for row, rec in enumerate(items, 1):
        where = f"{path}:row {row}"
        if not isinstance(rec, dict):
            yield where, _Bad(f"a record must be a JSON object; got {type(rec).__name__}")
        else:
            yield where, rec


def _csv_rows(path: Path, delimiter: str, cap: int, fn: str) -> Iterator[Row]:
    old = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1, cap))  # texts are long; the default is 128 KiB
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            long_lines: list[int] = []  # over the cap: skipped (unkept) before the csv module sees them

            def lines() -> Iterator[str]:
                for lineno, line in _bounded_lines(f, cap):
                    if isinstance(line, int):
                        long_lines.append(lineno)
                        yield "\n"  # an empty line: no row
                    else:
                        yield line

            reader = csv.DictReader(lines(), delimiter=delimiter)
            try:
                for row, rec in enumerate(reader, 1):
                    while long_lines:
                        yield f"{path}:line {long_lines.pop(0)}", _too_big(cap)
                    # A short row gives None for its missing fields: treat them as absent.
                    yield f"{path}:row {row}", {k: v for k, v in rec.items() if k is not None and v is not None}
                while long_lines:
                    yield f"{path}:line {long_lines.pop(0)}", _too_big(cap)
            except (UnicodeDecodeError, csv.Error) as e:
                raise ValueError(
                    f"{fn}: {path} must be a UTF-8 {'TSV' if delimiter == chr(9) else 'CSV'} file with a "
                    f"header row; reading it failed near line {reader.line_num} ({type(e).__name__}: {e})."
                ) from None
    finally:
        csv.field_size_limit(old)


def _wanted_columns(names: Sequence[str], text_field: str, domain_field: str, partitioner: Any) -> list[str]:
    """Columns to read: all of them for a partitioner (its rules may use any field), else two."""
    if partitioner is not None:
        return list(names)
    return [c for c in (text_field, domain_field) if c in names]


def _parquet_rows(path: Path, text_field: str, domain_field: str, partitioner: Any, cap: int, fn: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise ValueError(f"{fn}: {path} must be a Parquet file; reading it failed ({type(e).__name__}: {e}).") from None
    cols = _wanted_columns(pf.schema_arrow.names, text_field, domain_field, partitioner)
    if not cols:  # neither field exists: every row is a bad record, still counted per row
        for row in range(1, pf.metadata.num_rows + 1):
            yield f"{path}:row {row}", {}
        return
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH, columns=cols):
        sizes = np.zeros(batch.num_rows, dtype=np.int64)  # bytes of each row's strings, before Python sees them
        for col in batch.columns:
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type):
                sizes += pc.fill_null(pc.binary_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        big = sizes > cap
        recs = batch.filter(pa.array(~big)).to_pylist() if big.any() else batch.to_pylist()
        it = iter(recs)
        for too_big in big.tolist():
            row += 1
            yield f"{path}:row {row}", (_too_big(cap) if too_big else next(it))


def _dataset_rows(ds: Any, label: str, text_field: str, domain_field: str, partitioner: Any) -> Iterator[Row]:
    cols = _wanted_columns(ds.column_names, text_field, domain_field, partitioner)
    if not cols:
        for row in range(1, len(ds) + 1):
            yield f"{label}:row {row}", {}
        return
    row = 0
    for batch in ds.select_columns(cols).iter(batch_size=_BATCH):
        for values in zip(*(batch[c] for c in cols)):
            row += 1
            yield f"{label}:row {row}", dict(zip(cols, values))


def _load_from_disk(path: Path, fn: str) -> Any:
    import datasets

    if not any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        raise ValueError(
            f"{fn}: a folder must be written by datasets.Dataset.save_to_disk (with state.json or "
            f"dataset_dict.json); got {str(path)!r}."
        )
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(
                f"{fn}: a saved DatasetDict must have a 'train' split (save the split to load with "
                f"ds[split].save_to_disk(...)); got splits {sorted(ds)} in {str(path)!r}."
            )
        ds = ds["train"]
    return ds


def _looks_local(src: str | os.PathLike[str]) -> bool:
    """A ``PathLike``, an existing path, a data-file suffix or an explicit path prefix is local;
    anything else (``"org/name"``) is a hub dataset name."""
    if isinstance(src, os.PathLike):
        return True
    s = str(src)
    if Path(s).expanduser().exists():
        return True
    return Path(s).suffix.lower() in _SUFFIXES or s.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in s


def _rows(
    fn: str, src: str | os.PathLike[str], text_field: str, domain_field: str, partitioner: Any, cap: int
) -> tuple[str, Iterator[Row]]:
    """``(label, rows)`` of one source (``label`` names it in messages)."""
    if not _looks_local(src):
        import datasets

        name = str(src)
        ds = datasets.load_dataset(name, split="train")
        return name, _dataset_rows(ds, name, text_field, domain_field, partitioner)
    path = Path(src).expanduser()
    if not path.exists():
        raise ValueError(
            f"{fn}: paths must be existing files or folders (or a hub dataset name); got missing {str(path)!r}."
        )
    if path.is_dir():
        return str(path), _dataset_rows(_load_from_disk(path, fn), str(path), text_field, domain_field, partitioner)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return str(path), _jsonl_rows(path, cap)
    if suffix == ".json":
        return str(path), _json_rows(path, cap, fn)
    if suffix == ".parquet":
        return str(path), _parquet_rows(path, text_field, domain_field, partitioner, cap, fn)
    if suffix in (".csv", ".tsv"):
        return str(path), _csv_rows(path, "," if suffix == ".csv" else "\t", cap, fn)
    raise ValueError(
        f"{fn}: paths must end in one of {list(_SUFFIXES)} or be a save_to_disk folder; got {str(path)!r} "
        "(convert it, or load it with datasets and pass the folder written by save_to_disk)."
    )


def _state(path: Path) -> list[int]:
    """What a change to the file ``path`` moves: ``[size, mtime_ns, ctime_ns, inode]``."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)]


def source_state(src: str | os.PathLike[str]) -> Any:
    """The identity of a local source as it is now (a file's size, times and inode; a folder's files'),
    JSON-serialisable, or ``None`` for a hub dataset name or a missing path (nothing to compare)."""
    if not _looks_local(src):
        return None
    path = Path(src).expanduser()
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return [str(path.resolve()), [[str(p.relative_to(path)), _state(p)] for p in files]]
        return [str(path.resolve()), _state(path)]
    except OSError:
        return None


def source_contents(src: str | os.PathLike[str]) -> Any:
    """The SHA-256 of a local source's bytes (a folder's: of each of its files), JSON-serialisable,
    or ``None`` for a hub dataset name or a missing path."""
    from ddk._io import file_sha256

    if not _looks_local(src):
        return None
    path = Path(src).expanduser()
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return [[str(p.relative_to(path)), file_sha256(p)] for p in files]
        return file_sha256(path)
    except OSError:
        return None
