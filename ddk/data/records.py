"""``load_records``: a user's domain-labelled corpus files -> one ``datasets.Dataset`` of
``text`` / ``domain``.

Formats, chosen by suffix: ``.jsonl`` / ``.json`` (JSON lines, or one JSON array of records),
``.parquet``, ``.csv``, ``.tsv``; a folder written by ``datasets.Dataset.save_to_disk`` (or a
``DatasetDict``'s, whose ``"train"`` split is read); any other string that is not a local path is
a Hugging Face hub dataset name, read with ``datasets.load_dataset(name, split="train")``.
A source given as a ``(domain, path)`` pair (or a ``{domain: path}`` mapping) is one domain's
file: each of its records gets that domain, whatever its domain field holds (it need not have one).

Bad records (no text, no domain, a domain that is not a non-empty str, a corrupted JSON line, a
record larger than ``max_record_bytes``) are reported as ``<file>:<line>`` (JSONL) or ``<file>:row <n>`` (other formats, 1-based, header not
counted) and either raise or, with ``on_missing="skip"``, are dropped with one warning.
Memory stays bounded by the record cap: a JSONL line is read at most ``max_record_bytes + 1``
bytes at a time, and the rest of a longer line is skipped in 1 MiB pieces without being kept (so a
50 MB line costs about the cap, not its size); a CSV/TSV line likewise; a Parquet batch's string
sizes are measured before its rows become Python objects. A ``.json`` array is parsed whole (its
size is the file's), then its records are checked against the cap.
Domain names later name files and folders, so names with a path separator, a NUL, or equal to
``.`` / ``..`` are always an error.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets

    from ddk.partition.partitioner import DomainPartitioner

__all__ = ["load_records"]

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


def _json_rows(path: Path, cap: int) -> Iterator[Row]:
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
            f"load_records: a .json file must hold one JSON array of records or JSON lines; "
            f"{path} starts with '[' but is not valid JSON ({type(e).__name__}: {e})."
        ) from None
    for row, rec in enumerate(items, 1):
        where = f"{path}:row {row}"
        if not isinstance(rec, dict):
            yield where, _Bad(f"a record must be a JSON object; got {type(rec).__name__}")
        else:
            yield where, rec


def _csv_rows(path: Path, delimiter: str, cap: int) -> Iterator[Row]:
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
                    f"load_records: {path} must be a UTF-8 {'TSV' if delimiter == chr(9) else 'CSV'} file with a "
                    f"header row; reading it failed near line {reader.line_num} ({type(e).__name__}: {e})."
                ) from None
    finally:
        csv.field_size_limit(old)


def _wanted_columns(names: Sequence[str], text_field: str, domain_field: str, partitioner: Any) -> list[str]:
    """Columns to read: all of them for a partitioner (its rules may use any field), else two."""
    if partitioner is not None:
        return list(names)
    return [c for c in (text_field, domain_field) if c in names]


def _parquet_rows(path: Path, text_field: str, domain_field: str, partitioner: Any, cap: int) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise ValueError(
            f"load_records: {path} must be a Parquet file; reading it failed ({type(e).__name__}: {e})."
        ) from None
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


def _load_from_disk(path: Path) -> Any:
    import datasets

    if not any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        raise ValueError(
            f"load_records: a folder must be written by datasets.Dataset.save_to_disk (with state.json or "
            f"dataset_dict.json); got {str(path)!r}."
        )
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(
                f"load_records: a saved DatasetDict must have a 'train' split (save the split to load with "
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
    src: str | os.PathLike[str], text_field: str, domain_field: str, partitioner: Any, cap: int
) -> tuple[str, Iterator[Row]]:
    """``(label, rows)`` of one source (``label`` names it in messages)."""
    fn = "load_records"
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
        return str(path), _dataset_rows(_load_from_disk(path), str(path), text_field, domain_field, partitioner)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return str(path), _jsonl_rows(path, cap)
    if suffix == ".json":
        return str(path), _json_rows(path, cap)
    if suffix == ".parquet":
        return str(path), _parquet_rows(path, text_field, domain_field, partitioner, cap)
    if suffix in (".csv", ".tsv"):
        return str(path), _csv_rows(path, "," if suffix == ".csv" else "\t", cap)
    raise ValueError(
        f"{fn}: paths must end in one of {list(_SUFFIXES)} or be a save_to_disk folder; got {str(path)!r} "
        "(convert it, or load it with datasets and pass the folder written by save_to_disk)."
    )


# ---------------------------------------------------------------------------- public
def _record_problem(
    rec: Mapping[str, Any],
    text_field: str,
    domain_field: str,
    partitioner: DomainPartitioner | None,
    cap: int,
    domain: str | None = None,
) -> tuple[str, str] | str:
    """``(text, domain)`` of a record (``domain``: the source's own, for every record), or the reason it is bad."""
    if sum(len(v) for v in rec.values() if isinstance(v, (str, bytes))) > cap:  # characters <= UTF-8 bytes
        return _too_big(cap).reason
    if text_field not in rec:
        return f"missing field {text_field!r}"
    text = rec[text_field]
    if not isinstance(text, str):
        return f"field {text_field!r} must be a str; got {text!r:.60}"
    if domain is not None:
        return text, domain
    if partitioner is not None:
        try:
            domain = partitioner.assign(rec)
        except (ValueError, TypeError) as e:
            return f"the partitioner cannot assign a domain ({e})"
    else:
        if domain_field not in rec:
            return f"missing field {domain_field!r}"
        domain = rec[domain_field]
    if not isinstance(domain, str) or not domain:
        return f"the domain must be a non-empty str; got {domain!r:.60}"
    return text, domain


def _sources(fn: str, paths: Any, partitioner: Any) -> list[tuple[str | None, str | os.PathLike[str]]]:
    """``paths`` as ``(domain or None, source)`` pairs, checked."""
    if isinstance(paths, (str, os.PathLike)):
        items: list[Any] = [paths]
    elif isinstance(paths, Mapping):
        items = list(paths.items())
    elif isinstance(paths, Sequence):
        items = list(paths)
    else:
        items = [None]  # the error below
    out: list[tuple[str | None, str | os.PathLike[str]]] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            out.append((None, item))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], (str, os.PathLike))
        ):
            name, src = item
            if not name:
                raise ValueError(f"{fn}: a (domain, path) source must name its domain; got {item!r}.")
            _check_domain_name(fn, name, f"the domain of {str(src)!r}")
            out.append((name, src))
        else:
            raise TypeError(
                f"{fn}: paths must be a path, a dataset name, a (domain, path) pair, a sequence of them or a "
                f"{{domain: path}} mapping; got {paths!r:.80}."
            )
    if partitioner is not None and any(name is not None for name, _ in out):
        raise ValueError(
            f"{fn}: partitioner must not be combined with (domain, path) sources (it assigns every record's "
            f"domain); got the sources {[str(s) for n, s in out if n is not None]} with their own domains."
        )
    return out


def load_records(
    paths: str
    | os.PathLike[str]
    | Sequence[str | os.PathLike[str] | tuple[str, str | os.PathLike[str]]]
    | Mapping[str, str | os.PathLike[str]],
    *,
    text_field: str = "text",
    domain_field: str = "domain",
    partitioner: DomainPartitioner | None = None,
    on_missing: str = "raise",
    max_record_bytes: int = MAX_RECORD_BYTES,
    progress: bool = True,
) -> datasets.Dataset:
    """Read domain-labelled records from files, folders or a hub dataset into one dataset.

    Args:
        paths: one source or a sequence of them, read in order: ``.jsonl`` / ``.json`` (JSON
            lines or a JSON array), ``.parquet``, ``.csv``, ``.tsv``, a ``save_to_disk`` folder
            (a ``DatasetDict``'s ``"train"`` split), or a hub dataset name (a string that is not a
            local path: ``datasets.load_dataset(name, split="train")``). A ``(domain, path)`` pair,
            or each item of a ``{domain: path}`` mapping, is one domain's source: every record of
            it gets that domain (its ``domain_field`` is not read). Pairs and plain paths mix; a
            single pair goes in a list (``[("code", "code.jsonl")]``).
        text_field: the field holding each record's text (a str; may be empty).
        domain_field: the field holding each record's domain name (a non-empty str). Ignored
            when ``partitioner`` is given, and for the sources given with their domain.
        partitioner: a ``ddk.DomainPartitioner`` (e.g. ``by_rules`` on a ``"source"`` field)
            that assigns each record's domain from the whole record instead of ``domain_field``.
        on_missing: ``"raise"`` (a ``ValueError`` listing the first bad records as
            ``file:line: reason`` with their count) or ``"skip"`` (drop them and warn once with
            the count per file). A bad record lacks the text or domain field, has a non-str text,
            a domain that is not a non-empty str, is a corrupted JSON line, is larger than
            ``max_record_bytes``, or is one the partitioner rejects.
        max_record_bytes: the largest record read (its JSONL or CSV line, or the sum of its
            strings), >= 1; a larger one is a bad record, skipped unread. It bounds the memory
            of reading (about a few times the cap, not the largest line). Default 32 MiB.
        progress: show a tqdm bar per source.

    Returns:
        A ``datasets.Dataset`` with exactly the columns ``"text"`` and ``"domain"`` (both
        ``string``), the records in file order and the sources concatenated in order. It is
        built in memory.

    Raises:
        ValueError: a missing local file, an unsupported suffix, bad records with
            ``on_missing="raise"``, a domain name that cannot name a file (contains ``/``, ``\\``
            or NUL, or is ``.`` / ``..``; never skipped), or no records at all.
        TypeError: arguments of the wrong type.

    Examples:
        >>> import json, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / "code.jsonl").write_text(json.dumps({"text": "def f(): pass"}) + "\\n")
        ...     print(load_records({"code": Path(d) / "code.jsonl"}, progress=False)[0])
        {'text': 'def f(): pass', 'domain': 'code'}
    """
    fn = "load_records"
    sources = _sources(fn, paths, partitioner)
    if not sources:
        raise ValueError(f"{fn}: paths must name at least one source; got [].")
    for arg, value in (("text_field", text_field), ("domain_field", domain_field)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{fn}: {arg} must be a non-empty str; got {value!r}.")
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"{fn}: on_missing must be 'raise' or 'skip'; got {on_missing!r}.")
    if not isinstance(max_record_bytes, int) or isinstance(max_record_bytes, bool) or max_record_bytes < 1:
        raise ValueError(f"{fn}: max_record_bytes must be an int >= 1; got {max_record_bytes!r}.")
    if partitioner is not None and not callable(getattr(partitioner, "assign", None)):
        raise TypeError(f"{fn}: partitioner must be a ddk.DomainPartitioner or None; got {type(partitioner).__name__}.")

    from tqdm.auto import tqdm

    texts: list[str] = []
    domains: list[str] = []
    bad: list[str] = []  # the first _SHOW, as "location: reason"
    bad_per_source: dict[str, int] = {}
    fields_seen: set[str] = set()  # the fields of the records, for a message when none is usable
    for named, src in sources:
        label, rows = _rows(src, text_field, domain_field, partitioner, max_record_bytes)
        count = 0
        for where, rec in tqdm(rows, desc=f"load {Path(label).name or label}", unit=" rec", disable=not progress):
            if not isinstance(rec, _Bad) and len(fields_seen) < 64 and hasattr(rec, "keys"):
                fields_seen.update(str(k) for k in rec.keys())
            got = (
                rec.reason
                if isinstance(rec, _Bad)
                else _record_problem(rec, text_field, domain_field, partitioner, max_record_bytes, named)
            )
            if isinstance(got, str):
                count += 1
                if len(bad) < _SHOW:
                    bad.append(f"{where}: {got}")
                continue
            text, domain = got
            _check_domain_name(fn, domain, where)
            texts.append(text)
            domains.append(domain)
        if count:
            bad_per_source[label] = count

    total_bad = sum(bad_per_source.values())
    wanted = {text_field} | ({domain_field} if partitioner is None and any(n is None for n, _ in sources) else set())
    hint = ""
    if total_bad and not texts and fields_seen and not wanted <= fields_seen:  # likely other field names
        hint = (
            f" The records have the fields {sorted(fields_seen)}: name yours with text_field= and domain_field= "
            "(CLI flags --text-field and --domain-field; DDKConfig(text_field=, domain_field=))."
        )
    if total_bad:
        listing = "\n  ".join(bad) + (f"\n  ... and {total_bad - len(bad)} more" if total_bad > len(bad) else "")
        if on_missing == "raise":
            field = "the partitioner's fields" if partitioner is not None else f"a non-empty str {domain_field!r}"
            raise ValueError(
                f"{fn}: every record must have a str {text_field!r} and {field}, within the size cap; got "
                f"{total_bad} bad record(s) "
                f"(fix them, or drop them with on_missing='skip', CLI flag --skip-bad-records):\n  {listing}{hint}"
            )
        per = ", ".join(f"{k}: {v}" for k, v in bad_per_source.items())
        warnings.warn(f"{fn}: skipped {total_bad} bad record(s) ({per}); the first:\n  {listing}", stacklevel=2)
    if not texts:
        raise ValueError(
            f"{fn}: paths must hold at least one valid record; got none in {[str(s) for _, s in sources]}.{hint}"
        )

    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "domain": datasets.Value("string")})
    return datasets.Dataset.from_dict({"text": texts, "domain": domains}, features=features)
