"""Corpus builder: domains -> per-domain ``train`` / ``validation`` (/ ``test``) JSONL and a manifest.

Layout of a built corpus folder::

    <out>/manifest.json              sizes, licences, provenance, skipped domains, build options
    <out>/<domain>/train.jsonl       one record per line: {"id", "domain", "source", "text"}
    <out>/<domain>/validation.jsonl
    <out>/<domain>/test.jsonl        only with ``test_fraction > 0``

Split: a unit (``source``) goes to validation iff ``stable_unit_hash(source, seed) <
validation_fraction`` (the partitioner's BLAKE2b hash), so a file, conversation, entry or chapter
is never cut between the sides and never changes side when data is added. A domain with at least
two units always gets both sides (the lowest-hash unit is moved to validation, or the highest to
train, when the threshold leaves a side empty). With ``test_fraction > 0`` the units whose hash
lies in ``[validation_fraction, validation_fraction + test_fraction)`` form a third, ``test``
side (at least one unit; a domain needs three), read by no training method: the yardstick of
``bench/e2e``.

Cap: ``max_chars`` per domain, shared ``(1 - f - t) : f : t`` between train, validation and test; on each side
units are taken in hash order until the budget is spent (the last one truncated), so the kept
subset is stable too. Long units are cut into records of at most ``record_chars`` at line
breaks; all records of a unit share its ``source`` and side.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ddk._io import atomic_write_text, child_path, file_sha256, folder_lock, json_fingerprint, read_json, safe_name
from ddk.partition.partitioner import stable_unit_hash
from ddk.recipes.sources import DEFAULT_CACHE_DIR, DOMAINS, DomainUnavailable, PackageCache, Unit, folder_units

__all__ = [
    "CorpusConfig",
    "CorpusError",
    "build_corpus",
    "jsonl_units",
    "load_corpus",
    "read_jsonl",
    "split_units",
]

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")  # and "test" when the corpus was built with test_fraction > 0


def _splits(config: CorpusConfig) -> tuple[str, ...]:
    return SPLITS + (("test",) if config.test_fraction > 0 else ())


_MANIFEST_VERSION = 1


class CorpusError(ValueError):
    """Bad corpus input (e.g. corrupted JSONL lines); the message names every file and line."""


@dataclass(frozen=True)
class CorpusConfig:
    """Options of ``build_corpus``.

    Attributes:
        domains: built-in domains to collect (names of ``ddk.recipes.sources.DOMAINS``); ``()`` for none.
        user_folders: extra domains ``name -> folder of text files`` (one unit per file).
        user_jsonl: JSONL files whose records carry ``"domain"`` and ``"text"`` (and optionally
            ``"id"``, ``"source"``: records sharing a source, e.g. a conversation, stay together).
        max_chars: per-domain size cap in characters (train + validation), ``None`` = no cap.
        validation_fraction: share of units (by hash) in validation, in ``(0, 1)``.
        test_fraction: share of units (by hash) in a held-out ``test`` side, in ``[0, 1)``
            (0: no test side; ``validation_fraction + test_fraction < 1``).
        record_chars: longest record; longer units are cut at line breaks.
        seed: seed of the split hash.
        cache_dir: package cache (default ``~/.cache/ddk/debs``).
        offline: use only packages already in the cache.
        skip_bad_lines: drop corrupted lines of ``user_jsonl`` files (each reported on stderr and
            counted under ``"skipped_lines"`` in the manifest) instead of raising ``CorpusError``.
            Not part of ``key()``: a build that succeeds without it gives the same corpus.

    ``key()`` hashes the options and the *contents* of the user files and folders (SHA-256), so
    an edited JSONL file or folder gives a new key; ``offline`` and ``cache_dir`` are left out
    (they change how packages are had, not the corpus), and a build with a skipped domain is
    never reused as complete (see ``build_corpus``).
    """

    domains: tuple[str, ...] = tuple(DOMAINS)
    user_folders: Mapping[str, str] = field(default_factory=dict)
    user_jsonl: tuple[str, ...] = ()
    max_chars: int | None = 2_000_000
    validation_fraction: float = 0.05
    test_fraction: float = 0.0
    record_chars: int = 4000
    seed: int = 0
    cache_dir: str | None = None
    offline: bool = False
    skip_bad_lines: bool = False

    def key(self) -> str:
        """Hash of everything that changes the built corpus: options and user-file contents (not the cache location)."""
        d = asdict(self)
        d.pop("cache_dir")
        d.pop("offline")
        d.pop("skip_bad_lines")
        if not self.test_fraction:
            d.pop("test_fraction")  # corpora built before the test side keep their key
        d["user_folders"] = sorted((k, _tree_digest(Path(v))) for k, v in self.user_folders.items())
        d["user_jsonl"] = [
            file_sha256(p) if Path(p).is_file() else f"missing:{Path(p).resolve()}" for p in self.user_jsonl
        ]
        return json_fingerprint(d)


def _tree_digest(folder: Path) -> str:
    """SHA-256 over the relative paths and contents of every file under ``folder`` (sorted)."""
    if not folder.is_dir():
        return f"missing:{folder.resolve()}"
    sha = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha.update(str(f.relative_to(folder)).encode("utf-8", "surrogateescape") + b"\0" + file_sha256(f).encode())
    return sha.hexdigest()


def _check_config(cfg: CorpusConfig) -> None:
    fn = "build_corpus"
    unknown = [d for d in cfg.domains if d not in DOMAINS]
    if unknown:
        raise ValueError(
            f"{fn}: domains must be among the built-in {list(DOMAINS)} (add others with user_folders/user_jsonl); got unknown {unknown}."
        )
    if cfg.max_chars is not None and (not isinstance(cfg.max_chars, int) or cfg.max_chars < 1):
        raise ValueError(f"{fn}: max_chars must be a positive int or None; got {cfg.max_chars!r}.")
    if not 0.0 < cfg.validation_fraction < 1.0:
        raise ValueError(f"{fn}: validation_fraction must be in (0, 1); got {cfg.validation_fraction!r}.")
    if not 0.0 <= cfg.test_fraction < 1.0 - cfg.validation_fraction:
        raise ValueError(
            f"{fn}: test_fraction must be in [0, 1 - validation_fraction) = [0, {1.0 - cfg.validation_fraction:g}); "
            f"got {cfg.test_fraction!r}."
        )
    if not isinstance(cfg.record_chars, int) or cfg.record_chars < 16:
        raise ValueError(f"{fn}: record_chars must be an int >= 16; got {cfg.record_chars!r}.")
    for name in cfg.user_folders:
        safe_name(fn, "user_folders names", name, "A domain name names its folder in the corpus.")
    clash = sorted(set(cfg.user_folders) & set(cfg.domains))
    if clash:
        raise ValueError(f"{fn}: user_folders names must differ from the built-in domains collected; got {clash}.")


# ---------------------------------------------------------------------------- JSONL
def read_jsonl(
    path: str | os.PathLike[str],
    *,
    on_error: str = "raise",
    required: Sequence[str] = (),
    bad_lines: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Read a JSONL file, reporting every corrupted line with its file and line number.

    A corrupted line is one that is not UTF-8, not JSON, not a JSON object, or lacks a
    ``required`` key.

    Args:
        path: the file.
        on_error: ``"raise"`` (a ``CorpusError`` listing all bad lines) or ``"skip"`` (drop them
            and print one warning listing them to stderr); skipping must be asked for.
        required: keys every record must have (a record missing one counts as corrupted).
        bad_lines: when given, one ``"<file>:<line>: <reason>"`` per skipped line is appended
            (to count them).

    Returns:
        The records (dicts) in file order; blank lines are ignored.
    """
    fn = "read_jsonl"
    if on_error not in ("raise", "skip"):
        raise ValueError(f"{fn}: on_error must be 'raise' or 'skip'; got {on_error!r}.")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{fn}: path must be an existing file; got {str(p)!r}.")
    out: list[dict[str, Any]] = []
    bad: list[str] = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                bad.append(f"{p}:{lineno}: {type(e).__name__}: {e}")
                continue
            if not isinstance(rec, dict):
                bad.append(f"{p}:{lineno}: a record must be a JSON object; got {type(rec).__name__}")
                continue
            missing = [k for k in required if k not in rec]
            if missing:
                bad.append(f"{p}:{lineno}: a record must have keys {list(required)}; missing {missing}")
                continue
            out.append(rec)
    if bad:
        listing = "\n  ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
        if on_error == "raise":
            raise CorpusError(
                f"{fn}: every line of {p} must be a JSON object; got {len(bad)} corrupted line(s) (fix them, "
                f"or skip them with on_error='skip' / skip_bad_lines=True / --skip-bad-lines):\n  {listing}"
            )
        if bad_lines is not None:
            bad_lines.extend(bad)
        print(f"warning: {fn}: skipped {len(bad)} corrupted line(s):\n  {listing}", file=sys.stderr)
    return out


def _constant(text: str) -> Any:
    """A loader returning ``text`` (a ``Unit``'s text, already in memory)."""
    return lambda: text


def jsonl_units(
    path: str | os.PathLike[str], *, on_error: str = "raise", bad_lines: list[str] | None = None
) -> dict[str, list[Unit]]:
    """Units of a user JSONL file with a ``domain`` field: ``domain -> units``.

    Records sharing ``source`` (default: ``id``, else ``<file>:<line>``) are joined into one unit
    (blank line between them), so a conversation given as several records stays on one side.
    ``on_error`` and ``bad_lines`` are those of ``read_jsonl``.
    """
    fn = "jsonl_units"
    recs = read_jsonl(path, on_error=on_error, required=("domain", "text"), bad_lines=bad_lines)
    grouped: dict[str, dict[str, list[str]]] = {}
    for i, r in enumerate(recs):
        if not isinstance(r["domain"], str) or not r["domain"] or not isinstance(r["text"], str):
            raise CorpusError(
                f"{fn}: records of {path} must have a non-empty str 'domain' and a str 'text'; got record {i}: {str(r)[:120]}."
            )
        try:
            safe_name(
                fn,
                f"the domain of record {i} of {path}",
                r["domain"],
                "A domain name names its folder in the corpus: rename the domain in the file.",
            )
        except ValueError as exc:
            raise CorpusError(str(exc)) from None
        src = str(r.get("source") or r.get("id") or f"{Path(path).name}:{i}")
        grouped.setdefault(r["domain"], {}).setdefault(src, []).append(r["text"])
    return {
        d: [Unit(src, _constant("\n\n".join(texts))) for src, texts in sorted(g.items())] for d, g in grouped.items()
    }


def _write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---------------------------------------------------------------------------- split + cap
def _chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of at most ``size`` chars, cut at the last line break of each window when there is one."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            nl = text.rfind("\n", start + size // 2, end)
            if nl > start:
                end = nl + 1
        yield text[start:end]
        start = end


def split_units(
    units: Sequence[Unit], *, validation_fraction: float, seed: int = 0, test_fraction: float = 0.0
) -> dict[str, list[Unit]]:
    """Assign whole units to ``train``/``validation`` (/``test``) by the stable hash of their source.

    A unit goes to validation iff its hash is below ``validation_fraction``, to test iff it lies in
    ``[validation_fraction, validation_fraction + test_fraction)``; each side gets at least one unit.

    Returns:
        ``{"train": [...], "validation": [...]}`` (and ``"test"`` when ``test_fraction > 0``), each
        side in increasing hash order.

    Raises:
        ValueError: fewer distinct sources than sides (a domain needs one on each side).
    """
    fn = "split_units"
    by_src: dict[str, Unit] = {}
    for u in units:
        by_src.setdefault(u.source, u)
    sides = 3 if test_fraction > 0 else 2
    if len(by_src) < sides:
        raise ValueError(
            f"{fn}: units must come from at least {sides} distinct sources (one per side); got {len(by_src)}."
        )
    ranked = sorted(by_src.values(), key=lambda u: (stable_unit_hash(u.source, seed), u.source))
    hashes = [stable_unit_hash(u.source, seed) for u in ranked]
    n_val = sum(h < validation_fraction for h in hashes)
    n_val = min(max(n_val, 1), len(ranked) - sides + 1)
    if sides == 2:
        return {"validation": ranked[:n_val], "train": ranked[n_val:]}
    n_test = sum(validation_fraction <= h < validation_fraction + test_fraction for h in hashes[n_val:])
    n_test = min(max(n_test, 1), len(ranked) - n_val - 1)
    return {"validation": ranked[:n_val], "test": ranked[n_val : n_val + n_test], "train": ranked[n_val + n_test :]}


def _take(
    domain: str, units: Sequence[Unit], budget: int | None, record_chars: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records: list[dict[str, Any]] = []
    chars = 0
    sources = 0
    truncated = False
    for u in units:
        if budget is not None and chars >= budget:
            truncated = True
            break
        try:
            text = u.load()
        except (OSError, UnicodeError, ValueError) as e:
            print(f"warning: corpus: skipped {domain}:{u.source}: {e}", file=sys.stderr)
            continue
        if not text.strip():
            continue
        if budget is not None and chars + len(text) > budget:
            text = text[: budget - chars]
            truncated = True
        sources += 1
        for k, piece in enumerate(_chunks(text, record_chars)):
            records.append({"id": f"{domain}/{u.source}#{k}", "domain": domain, "source": u.source, "text": piece})
        chars += len(text)
    return records, {"records": len(records), "chars": chars, "sources": sources, "truncated": truncated}


# ---------------------------------------------------------------------------- build / load
def build_corpus(
    out_dir: str | os.PathLike[str],
    config: CorpusConfig = CorpusConfig(),
    *,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect the domains, split and cap them, and write the JSONL files and the manifest.

    A folder already built with the same ``config.key()`` is reused unless ``force``, provided
    its build was complete and every JSONL file still has the SHA-256 of the manifest (else it is
    rebuilt, with a warning). Domains that cannot be had (package missing, fetch failure, too few
    units) are reported on stderr by name and listed under ``"skipped"`` in the manifest (which
    then says ``"complete": false``, so the next build tries them again); they never vanish
    silently. Domain names must be safe file names (no separator, no ``..``): every file is
    written inside ``out_dir``. One build writes a folder (and a package cache) at a time; a
    second one waits for it.

    Args:
        out_dir: the corpus folder.
        config: see ``CorpusConfig``.
        force: rebuild even when the manifest matches.
        progress: print one line per domain.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: bad options; no domain at all could be built.
        CorpusError: corrupted user JSONL (every bad line named), unless ``config.skip_bad_lines``.
    """
    _check_config(config)
    out = Path(out_dir)
    with folder_lock(out, "build_corpus", "out_dir", wait=True):  # one writer per corpus folder; others wait
        return _build_corpus(out, config, force, progress)


def _reusable(out: Path, key: str) -> dict[str, Any] | None:
    """The manifest of ``out`` if it was built with ``key``, is complete (no skipped domain) and its
    files still have their SHA-256; else None (with a warning saying why, when it is not a plain miss)."""
    try:
        old = read_json(out / MANIFEST, fn="build_corpus")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        print(f"warning: corpus: rebuilding {out}: its {MANIFEST} is unreadable ({exc})", file=sys.stderr)
        return None
    if not isinstance(old, dict) or old.get("key") != key:
        return None
    if old.get("skipped"):
        print(
            f"warning: corpus: rebuilding {out}: its last build skipped {sorted(old['skipped'])}; trying them again",
            file=sys.stderr,
        )
        return None
    for name, entry in (old.get("domains") or {}).items():
        for side in (*SPLITS, "test"):
            if side == "test" and "test" not in entry:
                continue
            f = out / name / f"{side}.jsonl"
            want = (entry.get(side) or {}).get("sha256")
            if _name_problem_free(name) and f.is_file() and want is not None and file_sha256(f) == want:
                continue
            print(f"warning: corpus: rebuilding {out}: {f} is missing or changed since it was built", file=sys.stderr)
            return None
    return old


def _name_problem_free(name: str) -> bool:
    try:
        safe_name("build_corpus", "domain", name)
        return True
    except ValueError:
        return False


def _build_corpus(out: Path, config: CorpusConfig, force: bool, progress: bool) -> dict[str, Any]:
    key = config.key()
    man_path = out / MANIFEST
    if not force:
        old = _reusable(out, key)
        if old is not None:
            return old
    t0 = time.perf_counter()
    sources, skipped, skipped_lines = _collect_sources(config)
    domains = _write_domains(out, sources, skipped, config, progress)
    for name, why in skipped.items():
        print(f"warning: corpus: domain {name!r} skipped: {why}", file=sys.stderr)
    if not domains:
        raise ValueError(f"build_corpus: at least one domain must be available; got none (skipped: {skipped}).")
    manifest = {
        "version": _MANIFEST_VERSION,
        "key": key,
        "complete": not skipped,
        "digest": json_fingerprint(
            {d: {side: e[side]["sha256"] for side in _splits(config)} for d, e in domains.items()}
        ),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "config": {
            **asdict(config),
            "user_folders": dict(config.user_folders),
            "domains": list(config.domains),
            "user_jsonl": list(config.user_jsonl),
        },
        "domains": domains,
        "skipped": skipped,
        "skipped_lines": skipped_lines,
        "note": "Rebuilt from the packages; several licences (GPL, GFDL) forbid committing it.",
    }
    atomic_write_text(man_path, json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


_Sources = dict[str, tuple[str, str, str, list[Unit]]]  # name -> (provenance, licence, description, units)


def _collect_sources(config: CorpusConfig) -> tuple[_Sources, dict[str, str], dict[str, int]]:
    """``(sources, skipped domains with the reason, skipped JSONL lines per file)`` of the config's domains."""
    cache = PackageCache(config.cache_dir or DEFAULT_CACHE_DIR, offline=config.offline)
    sources: _Sources = {}
    skipped: dict[str, str] = {}
    if config.domains:  # one writer per package cache: two builds would break each other's dpkg -x
        with folder_lock(cache.root, "build_corpus", "cache_dir", wait=True):
            for name in config.domains:
                spec = DOMAINS[name]
                try:
                    prov, units = spec.units(cache)
                    sources[name] = (prov, spec.licence, spec.description, units)
                except (DomainUnavailable, OSError, ValueError) as e:
                    skipped[name] = str(e)
    for name, folder in sorted(config.user_folders.items()):
        try:
            sources[name] = (
                f"folder:{Path(folder).resolve()}",
                "user-provided",
                "user folder; unit = file",
                folder_units(folder, prefix=f"{name}/"),
            )
        except ValueError as e:
            skipped[name] = str(e)
    skipped_lines: dict[str, int] = {}
    for path in config.user_jsonl:
        bad: list[str] = []
        for name, units in jsonl_units(
            path, on_error="skip" if config.skip_bad_lines else "raise", bad_lines=bad
        ).items():
            if name in sources:
                prov, lic, desc, old_units = sources[name]
                sources[name] = (f"{prov} + jsonl:{Path(path).resolve()}", lic, desc, old_units + units)
            else:
                sources[name] = (f"jsonl:{Path(path).resolve()}", "user-provided", "user JSONL; unit = source", units)
        if bad:
            skipped_lines[str(Path(path).resolve())] = len(bad)
    return sources, skipped, skipped_lines


def _write_domains(
    out: Path, sources: _Sources, skipped: dict[str, str], config: CorpusConfig, progress: bool
) -> dict[str, Any]:
    """Split, cap and write every domain's JSONL files; return the manifest's ``domains`` (adds to ``skipped``)."""
    f, tf = config.validation_fraction, config.test_fraction
    splits = _splits(config)
    budgets: dict[str, int | None] = dict.fromkeys(splits)
    if config.max_chars is not None:
        held = {"validation": f, "test": tf}
        for side in splits[1:]:
            budgets[side] = max(1, int(round(config.max_chars * held[side])))
        budgets["train"] = config.max_chars - sum(b or 0 for b in budgets.values())
    domains: dict[str, Any] = {}
    for name in sorted(sources):
        prov, lic, desc, units = sources[name]
        try:
            sides = split_units(units, validation_fraction=f, seed=config.seed, test_fraction=tf)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        entry: dict[str, Any] = {"provenance": prov, "licence": lic, "description": desc, "units": len(units)}
        ddir = child_path("build_corpus", "domain", out, name)  # never outside the corpus folder
        ddir.mkdir(parents=True, exist_ok=True)
        for side in splits:
            recs, stats = _take(name, sides[side], budgets[side], config.record_chars)
            _write_jsonl_atomic(ddir / f"{side}.jsonl", recs)
            entry[side] = {**stats, "sha256": file_sha256(ddir / f"{side}.jsonl")}
        if any(entry[side]["records"] == 0 for side in splits):
            skipped[name] = "no non-empty text on one side of the split"
            continue
        domains[name] = entry
        if progress:
            print(
                f"corpus: {name:<14} train {entry['train']['chars']:>10,} chars / {entry['train']['sources']:>5} units   "
                f"validation {entry['validation']['chars']:>8,} chars / {entry['validation']['sources']:>4} units   "
                + (
                    f"test {entry['test']['chars']:>8,} chars / {entry['test']['sources']:>4} units   "
                    if "test" in entry
                    else ""
                )
                + f"[{prov}]",
                file=sys.stderr,
            )
    return domains


def load_manifest(corpus_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a built corpus folder."""
    p = Path(corpus_dir) / MANIFEST
    if not p.is_file():
        raise ValueError(
            f"load_manifest: corpus_dir must hold a {MANIFEST} (run `ddk data build`); got {str(Path(corpus_dir))!r}."
        )
    return read_json(p, fn="load_manifest")


def load_corpus(
    corpus_dir: str | os.PathLike[str], *, domains: Sequence[str] | None = None, on_error: str = "raise"
) -> Any:
    """A built corpus as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits.

    Columns ``id``, ``domain``, ``source``, ``text`` (str). Domains in manifest order (sorted),
    or ``domains``. Use ``DomainPartitioner.by_field("domain")`` to get per-domain sets back.
    A corrupted line raises ``CorpusError`` naming file and line; ``on_error="skip"`` drops it.
    """
    import datasets

    man = load_manifest(corpus_dir)
    names = list(domains) if domains is not None else list(man["domains"])
    unknown = [d for d in names if d not in man["domains"]]
    if unknown:
        raise ValueError(f"load_corpus: domains must be in the corpus {list(man['domains'])}; got unknown {unknown}.")
    out = {}
    for side in SPLITS:
        rows: dict[str, list[str]] = {"id": [], "domain": [], "source": [], "text": []}
        for d in names:
            for r in read_jsonl(
                child_path("load_corpus", "domain", corpus_dir, d) / f"{side}.jsonl",
                on_error=on_error,
                required=("id", "domain", "source", "text"),
            ):
                for k in rows:
                    rows[k].append(r[k])
        out[side] = datasets.Dataset.from_dict(rows)
    return datasets.DatasetDict(out)


def domain_texts(
    corpus_dir: str | os.PathLike[str], side: str, domains: Sequence[str] | None = None, *, on_error: str = "raise"
) -> dict[str, list[str]]:
    """``domain -> texts`` of one split, straight from the JSONL (no ``datasets`` needed).

    A corrupted line raises ``CorpusError`` naming file and line; ``on_error="skip"`` drops it.
    """
    man = load_manifest(corpus_dir)
    names = list(domains) if domains is not None else list(man["domains"])
    return {
        d: [
            r["text"]
            for r in read_jsonl(
                child_path("domain_texts", "domain", corpus_dir, d) / f"{side}.jsonl",
                on_error=on_error,
                required=("text",),
            )
        ]
        for d in names
    }
