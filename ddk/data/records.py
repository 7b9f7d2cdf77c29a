"""``load_records``: a user's domain-labelled corpus files -> one ``datasets.Dataset`` of
``text`` / ``domain``; and ``RecordStream``, the same records batch by batch, never all at once
(what ``ddk.data.pack_files`` reads).

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
size is the file's), then its records are checked against the cap. The readers are in
``ddk.data.readers``.
Domain names later name files and folders, so names with a path separator, a NUL, or equal to
``.`` / ``..`` are always an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddk._io import warn_user
from ddk.data.readers import MAX_RECORD_BYTES, _Bad, _check_domain_name, _rows, _too_big, source_contents, source_state

if TYPE_CHECKING:
    import datasets

    from ddk.partition.partitioner import DomainPartitioner

__all__ = ["RecordStream", "load_records"]

_SHOW = 5  # bad records listed in an error or warning
BATCH_RECORDS = 1000  # most records per batch of RecordStream.batches
BATCH_CHARS = 1 << 19  # most text characters per batch (a batch is never split inside a record)

Sources = (
    str
    | os.PathLike[str]
    | Sequence[str | os.PathLike[str] | tuple[str, str | os.PathLike[str]]]
    | Mapping[str, str | os.PathLike[str]]
)


class BadRecordsError(ValueError):
    """Bad records under ``on_missing="raise"``: the message in the API's words, and
    ``cli_message`` the same in the CLI's flags (what ``ddk`` prints)."""

    def __init__(self, message: str, cli_message: str = "") -> None:
        super().__init__(message)
        self.cli_message = cli_message or message

    def __reduce__(self) -> tuple[Any, ...]:  # both messages survive pickling (worker processes)
        return type(self), (str(self), self.cli_message)


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


def _check_arguments(
    fn: str, text_field: Any, domain_field: Any, on_missing: Any, max_record_bytes: Any, partitioner: Any
) -> None:
    for arg, value in (("text_field", text_field), ("domain_field", domain_field)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{fn}: {arg} must be a non-empty str; got {value!r}.")
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"{fn}: on_missing must be 'raise' or 'skip'; got {on_missing!r}.")
    if not isinstance(max_record_bytes, int) or isinstance(max_record_bytes, bool) or max_record_bytes < 1:
        raise ValueError(f"{fn}: max_record_bytes must be an int >= 1; got {max_record_bytes!r}.")
    if partitioner is not None and not callable(getattr(partitioner, "assign", None)):
        raise TypeError(f"{fn}: partitioner must be a ddk.DomainPartitioner or None; got {type(partitioner).__name__}.")


class RecordStream:
    """The records of some sources, read, checked and handed out batch by batch: what
    ``load_records`` reads, without ever holding more than one batch (and one source's reader).

    Args:
        paths: the sources, as ``load_records`` takes them.
        text_field: as ``load_records``'s.
        domain_field: as ``load_records``'s.
        partitioner: as ``load_records``'s.
        on_missing: as ``load_records``'s.
        max_record_bytes: as ``load_records``'s.
        progress: a tqdm bar per source.
        fn: the public function named in messages.
        bar: the tqdm bar's word before each source's name (``"load"``: ``load corpus.jsonl``).

    ``batches()`` yields ``(texts, domains)`` lists in file order, at most ``BATCH_RECORDS``
    records and about ``BATCH_CHARS`` characters of text each; at its end the bad records are
    reported exactly as ``load_records`` reports them (a ``ValueError``, or one warning with
    ``on_missing="skip"``), and a stream without a valid record is an error. ``failing`` turns
    True at the first bad record under ``on_missing="raise"`` (the end will raise: a consumer may
    stop working on the batches, the stream still reads on to count and list the bad records).

    Examples:
        >>> import json, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = Path(d) / "c.jsonl"
        ...     _ = path.write_text("".join(json.dumps({"domain": "a", "text": t}) + "\\n" for t in "xyz"))
        ...     print(list(RecordStream(path, progress=False).batches()))
        [(['x', 'y', 'z'], ['a', 'a', 'a'])]
    """

    def __init__(
        self,
        paths: Sources,
        *,
        text_field: str = "text",
        domain_field: str = "domain",
        partitioner: DomainPartitioner | None = None,
        on_missing: str = "raise",
        max_record_bytes: int = MAX_RECORD_BYTES,
        progress: bool = True,
        fn: str = "load_records",
        bar: str = "load",
    ) -> None:
        self.fn = fn
        self.sources = _sources(fn, paths, partitioner)
        if not self.sources:
            raise ValueError(f"{fn}: paths must name at least one source; got [].")
        _check_arguments(fn, text_field, domain_field, on_missing, max_record_bytes, partitioner)
        self.text_field, self.domain_field = text_field, domain_field
        self.partitioner = partitioner
        self.on_missing = on_missing
        self.max_record_bytes = max_record_bytes
        self.progress = progress
        self.bar = bar
        self.records = 0  # valid records handed out so far
        self.failing = False

    def fingerprint(self, kind: str = "stat") -> list[Any] | None:
        """What the records read depend on: every source's domain with, for ``kind="stat"``, its
        path and file identity now (size, times, inode: a ``stat`` per file), for
        ``kind="contents"`` the SHA-256 of its bytes (a read at disk speed, no parsing); and the
        reading options. ``None`` when it cannot be known without parsing the records (a hub
        dataset, a partitioner, a missing file)."""
        if self.partitioner is not None:
            return None
        of = source_state if kind == "stat" else source_contents
        states = [[named, of(src)] for named, src in self.sources]
        if any(state is None for _, state in states):
            return None
        return [states, self.text_field, self.domain_field, self.on_missing, self.max_record_bytes]

    def batches(
        self, max_records: int = BATCH_RECORDS, max_chars: int = BATCH_CHARS
    ) -> Iterator[tuple[list[str], list[str]]]:
        """``(texts, domains)`` of the valid records, in order, batch by batch (see the class)."""
        from tqdm.auto import tqdm

        fn = self.fn
        bad: list[str] = []  # the first _SHOW, as "location: reason"
        bad_per_source: dict[str, int] = {}
        fields_seen: set[str] = set()  # the fields of the records, for a message when none is usable
        texts: list[str] = []
        domains: list[str] = []
        chars = 0
        self.records = 0
        for named, src in self.sources:
            label, rows = _rows(fn, src, self.text_field, self.domain_field, self.partitioner, self.max_record_bytes)
            count = 0
            desc = f"{self.bar} {Path(label).name or label}"
            for where, rec in tqdm(rows, desc=desc, unit=" rec", disable=not self.progress):
                if not isinstance(rec, _Bad) and len(fields_seen) < 64 and hasattr(rec, "keys"):
                    fields_seen.update(str(k) for k in rec.keys())
                got = (
                    rec.reason
                    if isinstance(rec, _Bad)
                    else _record_problem(
                        rec, self.text_field, self.domain_field, self.partitioner, self.max_record_bytes, named
                    )
                )
                if isinstance(got, str):
                    count += 1
                    if len(bad) < _SHOW:
                        bad.append(f"{where}: {got}")
                    self.failing = self.on_missing == "raise"
                    continue
                text, domain = got
                _check_domain_name(fn, domain, where)
                texts.append(text)
                domains.append(domain)
                chars += len(text)
                if len(texts) >= max_records or chars >= max_chars:
                    self.records += len(texts)
                    yield texts, domains
                    texts, domains, chars = [], [], 0
            if count:
                bad_per_source[label] = count
        if texts:
            self.records += len(texts)
            yield texts, domains
        self._report(bad, bad_per_source, fields_seen)

    def _report(self, bad: list[str], bad_per_source: dict[str, int], fields_seen: set[str]) -> None:
        """Raise or warn for the bad records; raise when no record was valid."""
        fn = self.fn
        total_bad = sum(bad_per_source.values())
        named_all = all(n is not None for n, _ in self.sources)
        wanted = {self.text_field} | ({self.domain_field} if self.partitioner is None and not named_all else set())
        hint = ""
        if total_bad and not self.records and fields_seen and not wanted <= fields_seen:  # likely other field names
            hint = (
                f" The records have the fields {sorted(fields_seen)}: name yours with text_field= and domain_field= "
                "(CLI flags --text-field and --domain-field; DDKConfig(text_field=, domain_field=))."
            )
        if total_bad:
            more = f"\n  ... and {total_bad - len(bad)} more" if total_bad > len(bad) else ""
            listing = "\n  ".join(bad) + more
            if self.on_missing == "raise":
                field = (
                    "the partitioner's fields"
                    if self.partitioner is not None
                    else f"a non-empty str {self.domain_field!r}"
                )
                must = f"{fn}: every record must have a str {self.text_field!r} and {field}, within the size cap; got "
                raise BadRecordsError(
                    f"{must}{total_bad} bad record(s) "
                    f"(fix them, or drop them with on_missing='skip', CLI flag --skip-bad-records):\n  {listing}{hint}",
                    f"{must}{total_bad} bad record(s):\n  {listing}\n{self._cli_fix(bad, bad_per_source, fields_seen)}",
                )
            per = ", ".join(f"{k}: {v}" for k, v in bad_per_source.items())
            warn_user(f"{fn}: skipped {total_bad} bad record(s) ({per}); the first:\n  {listing}")
        if not self.records:
            raise ValueError(
                f"{fn}: paths must hold at least one valid record; got none in {[str(s) for _, s in self.sources]}.{hint}"
            )

    def _cli_fix(self, bad: list[str], bad_per_source: dict[str, int], fields_seen: set[str]) -> str:
        """What to do about bad records, in ``ddk``'s flags: a file without a domain field gets its
        domain with ``--data NAME=FILE``."""
        fields = f" (the records have the fields {sorted(fields_seen)})" if fields_seen else ""
        if self.partitioner is None and any(b.endswith(f"missing field {self.domain_field!r}") for b in bad):
            pairs = " ".join(f"{Path(x).stem or 'NAME'}={x}" for x in list(bad_per_source)[:3])
            return (
                f"Give each file its domain with --data NAME=FILE (here: --data {pairs}), or name the records' "
                f"domain field with --domain-field{fields}, or drop the bad records with --skip-bad-records."
            )
        if fields_seen and self.text_field not in fields_seen:
            return f"Name the records' text field with --text-field{fields}, or fix or drop them (--skip-bad-records)."
        return "Fix them, or drop them with --skip-bad-records."


def load_records(
    paths: Sources,
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
        built in memory: to pack a corpus larger than memory, ``ddk.data.pack_files`` reads the
        same sources batch by batch (``RecordStream``).

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
    stream = RecordStream(
        paths,
        text_field=text_field,
        domain_field=domain_field,
        partitioner=partitioner,
        on_missing=on_missing,
        max_record_bytes=max_record_bytes,
        progress=progress,
    )
    texts: list[str] = []
    domains: list[str] = []
    for t, d in stream.batches():
        texts += t
        domains += d

    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "domain": datasets.Value("string")})
    return datasets.Dataset.from_dict({"text": texts, "domain": domains}, features=features)
