"""Where the demo corpus comes from: Debian/PyPI packages fetched into a cache, read as text units.

A *unit* is what the train/validation split never cuts: one file for trees of files (code,
reST, TeX, fortune files, HTML chapters), one conversation for dialogue, one dictionary entry for
``dictd`` databases and one chapter for the R novels (a single R object holds each whole book).
Units are yielded lazily (``Unit.load()`` reads the text), so a size cap never reads a whole
source tree.

Packages are fetched with ``apt-get download`` + ``dpkg -x`` (no root needed, nothing installed;
when the apt lists are missing and we are root, ``apt-get update`` runs first) and with
``pip download --no-deps``, into ``cache_dir`` (default ``~/.cache/ddk/debs``).
"""

from __future__ import annotations

import gzip
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DOMAINS",
    "DomainSpec",
    "DomainUnavailable",
    "PackageCache",
    "Unit",
    "folder_units",
]

DEFAULT_CACHE_DIR = Path(os.environ.get("DDK_CACHE", Path.home() / ".cache" / "ddk")) / "debs"


class DomainUnavailable(RuntimeError):
    """A domain's package cannot be fetched or read here (the builder reports and skips it)."""


@dataclass(frozen=True)
class Unit:
    """One split unit: ``source`` (a stable name, the split key) and a lazy ``load() -> str``."""

    source: str
    load: Callable[[], str] = field(compare=False)


# ---------------------------------------------------------------------------- package cache
class PackageCache:
    """Fetches and unpacks Debian and PyPI packages into ``root`` (idempotent, no root needed).

    Args:
        root: cache folder (default ``~/.cache/ddk/debs``; PyPI files go to ``root/pypi``).
        offline: never run ``apt-get``/``pip``; only use what is already in the cache.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, offline: bool = False) -> None:
        self.root = Path(root) if root is not None else DEFAULT_CACHE_DIR
        self.offline = offline
        self._updated = False
        self.versions: dict[str, str] = {}

    def _run(self, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)

    def candidate(self, package: str) -> str | None:
        """The version apt would download (``apt-cache policy``), or None when unknown."""
        if shutil.which("apt-cache") is None:
            return None
        out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Candidate:\s*(\S+)", out)
        return None if m is None or m.group(1) == "(none)" else m.group(1)

    def first_available(self, candidates: list[str]) -> str:
        """The first Debian package of ``candidates`` that is cached or known to apt."""
        for name in candidates:
            if (self.root / name / ".extracted").is_file() or self.candidate(name):
                return name
        if not self.offline and not self._updated and self._apt_lists_missing() and _is_root():
            self._apt_update()
            for name in candidates:
                if self.candidate(name):
                    return name
        raise DomainUnavailable(f"none of the Debian packages {candidates} is available here (apt-cache policy)")

    @staticmethod
    def _apt_lists_missing() -> bool:
        lists = Path("/var/lib/apt/lists")
        return not lists.is_dir() or not any(
            p.name.endswith(("_Packages", "_Packages.lz4", "_Packages.xz", "_Packages.gz")) for p in lists.iterdir()
        )

    def _apt_update(self) -> None:
        self._updated = True
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)

    def deb(self, package: str) -> Path:
        """Folder where ``package``'s ``.deb`` is unpacked (``dpkg -x``), fetching it if needed."""
        dest = self.root / package
        if self._cached(package, dest):
            return dest
        if self.offline:
            raise DomainUnavailable(f"Debian package {package!r} is not in the cache {self.root} (offline)")
        for tool in ("apt-get", "dpkg"):
            if shutil.which(tool) is None:
                raise DomainUnavailable(f"{tool} is not installed (needed to fetch {package!r})")
        dl = self.root / "_downloads"
        dl.mkdir(parents=True, exist_ok=True)
        if self._apt_lists_missing() and _is_root() and not self._updated:
            self._apt_update()
        res = self._run(["apt-get", "download", package], dl)
        if res.returncode != 0 and _is_root() and not self._updated:
            self._apt_update()
            res = self._run(["apt-get", "download", package], dl)
        debs = sorted(dl.glob(f"{package}_*.deb"))
        if res.returncode != 0 or not debs:
            raise DomainUnavailable(f"apt-get download {package} failed: {(res.stderr or res.stdout).strip()[-300:]}")
        tmp = self.root / f".{package}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        res = self._run(["dpkg", "-x", str(debs[-1]), str(tmp)], self.root)
        if res.returncode != 0:
            raise DomainUnavailable(f"dpkg -x {debs[-1].name} failed: {res.stderr.strip()[-300:]}")
        return self._commit(package, tmp, dest, debs[-1].stem.split("_")[1])

    def pypi(self, package: str) -> Path:
        """Folder where ``package``'s wheel from PyPI is unpacked (``pip download --no-deps``)."""
        dest = self.root / "pypi" / package
        if self._cached(package, dest):
            return dest
        if self.offline:
            raise DomainUnavailable(f"PyPI package {package!r} is not in the cache {self.root} (offline)")
        dl = self.root / "pypi" / "_downloads"
        dl.mkdir(parents=True, exist_ok=True)
        res = self._run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dl), package], dl
        )
        norm = package.replace("-", "_").lower()
        wheels = sorted(p for p in dl.glob("*.whl") if p.name.lower().startswith(norm + "-"))
        if res.returncode != 0 or not wheels:
            raise DomainUnavailable(f"pip download {package} failed: {(res.stderr or res.stdout).strip()[-300:]}")
        tmp = dest.with_name(f".{package}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extractall(tmp)
        return self._commit(package, tmp, dest, wheels[-1].name.split("-")[1])

    def _cached(self, package: str, dest: Path) -> bool:
        """True (and ``versions`` updated) when ``dest`` holds a complete unpack of ``package``."""
        marker = dest / ".extracted"
        if not marker.is_file():
            return False
        self.versions[package] = marker.read_text().strip()
        return True

    def _commit(self, package: str, tmp: Path, dest: Path, version: str) -> Path:
        """Mark the unpacked ``tmp`` complete and move it to ``dest`` (replacing a partial one)."""
        (tmp / ".extracted").write_text(version + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        self.versions[package] = version
        return dest


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------------------- text helpers
def _read_text(path: Path) -> str:
    """UTF-8 text of a file, falling back to Latin-1 (old German fortunes are ISO-8859-1)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _text_unit(source: str, text: str) -> Unit:
    """A unit whose text is already in memory."""
    return Unit(source, lambda: text)


def _file_unit(source: str, path: Path, reader: Callable[[Path], str]) -> Unit:
    """A unit that reads ``path`` with ``reader`` when loaded."""
    return Unit(source, lambda: reader(path))


def _file_units(root: Path, files: list[Path], prefix: str, reader: Callable[[Path], str] = _read_text) -> list[Unit]:
    return [_file_unit(f"{prefix}{p.relative_to(root).as_posix()}", p, reader) for p in sorted(files)]


def folder_units(
    folder: str | os.PathLike[str], *, suffixes: tuple[str, ...] | None = None, prefix: str = ""
) -> list[Unit]:
    """One unit per regular file under ``folder`` (recursively; hidden files skipped).

    Args:
        folder: a directory of text files (a user's own domain).
        suffixes: keep only files ending in one of these (None: every file that decodes as text).
        prefix: prepended to the relative path to form ``source``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder_units: folder must be an existing directory; got {str(root)!r}.")
    files = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and (suffixes is None or p.name.endswith(suffixes))
    ]
    return _file_units(root, files, prefix)


class _HTMLText(html.parser.HTMLParser):
    _SKIP = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag in ("p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "pre", "dt", "dd"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page, with paragraph breaks (scripts, styles and head dropped)."""
    p = _HTMLText()
    p.feed(markup)
    text = "".join(p.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ---------------------------------------------------------------------------- domain readers
@dataclass(frozen=True)
class DomainSpec:
    """A built-in domain: ``units(cache)`` lists its split units; ``licence`` goes in the manifest."""

    name: str
    description: str
    licence: str
    units: Callable[[PackageCache], tuple[str, list[Unit]]]  # -> (provenance, units)


def _novels(cache: PackageCache) -> tuple[str, list[Unit]]:
    from ddk.recipes.rdata import read_lazyload_db

    root = cache.deb("r-cran-janeaustenr")
    base = root / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    books = read_lazyload_db(base)
    units: list[Unit] = []
    heading = re.compile(r"^\s*(chapter|volume)\b", re.IGNORECASE)
    for book, lines in sorted(books.items()):
        if not isinstance(lines, list) or not all(isinstance(x, (str, type(None))) for x in lines):
            continue
        chapters: list[list[str]] = [[]]
        for line in lines:
            line = line or ""
            if heading.match(line) and line.strip().lower().startswith("chapter") and chapters[-1]:
                chapters.append([])
            chapters[-1].append(line)
        for k, ch in enumerate(chapters):
            text = "\n".join(ch).strip() + "\n"
            units.append(_text_unit(f"janeaustenr/{book}#chapter{k:03d}", text))
    if not units:
        raise DomainUnavailable(f"no character vectors found in {base}.rdb")
    return f"deb:r-cran-janeaustenr={cache.versions.get('r-cran-janeaustenr', '?')}", units


_DICT_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64num(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _DICT_B64.index(ch)
    return n


def dictd_entries(index_path: Path, dict_path: Path) -> list[tuple[str, str]]:
    """``(headword, body)`` of a ``dictd`` database, one per distinct entry (``00-database-*`` dropped)."""
    raw = dict_path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # .dict.dz is gzip-compatible (dictzip)
        raw = gzip.decompress(raw)
    seen: set[int] = set()
    out: list[tuple[str, str]] = []
    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        off, length = _b64num(parts[1]), _b64num(parts[2])
        if off in seen:
            continue
        seen.add(off)
        out.append((parts[0], raw[off : off + length].decode("utf-8", errors="replace")))
    return out


def _encyclopedia(cache: PackageCache) -> tuple[str, list[Unit]]:
    root = cache.deb("dict-foldoc")
    entries = dictd_entries(root / "usr/share/dictd/foldoc.index", root / "usr/share/dictd/foldoc.dict.dz")
    units = [_text_unit(f"foldoc#{head}", body) for head, body in entries]
    return f"deb:dict-foldoc={cache.versions.get('dict-foldoc', '?')}", units


def _python_code(cache: PackageCache) -> tuple[str, list[Unit]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise DomainUnavailable(f"the interpreter's standard library {stdlib} is not a folder")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in stdlib.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(stdlib).parts)]
    ver = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return f"python-stdlib={ver} ({stdlib})", _file_units(stdlib, files, "stdlib/")


def _go_code(cache: PackageCache) -> tuple[str, list[Unit]]:
    names = []
    if shutil.which("apt-cache"):
        out = subprocess.run(
            ["apt-cache", "search", "--names-only", r"^golang-1\.[0-9]+-src$"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        names = sorted(
            {line.split()[0] for line in out.splitlines() if line.strip()},
            key=lambda n: [int(x) for x in re.findall(r"\d+", n)],
            reverse=True,
        )
    cached = sorted(p.name for p in cache.root.glob("golang-1.*-src") if (p / ".extracted").is_file())
    pkg = cache.first_available(cached + names or ["golang-1.19-src"])
    root = cache.deb(pkg)
    src = next(iter(sorted(root.glob("usr/share/go-*/src"))), None) or next(
        iter(sorted(root.glob("usr/lib/go-*/src"))), None
    )
    if src is None:
        raise DomainUnavailable(f"{pkg} has no usr/share/go-*/src folder")
    files = [p for p in src.rglob("*.go") if p.is_file() and "testdata" not in p.relative_to(src).parts]
    return f"deb:{pkg}={cache.versions.get(pkg, '?')}", _file_units(src, files, "go/")


def _tech_docs(cache: PackageCache) -> tuple[str, list[Unit]]:
    minor = sys.version_info.minor
    candidates = [f"python3.{m}-doc" for m in range(minor, minor - 4, -1)] + [
        f"python3.{m}-doc" for m in range(minor + 1, minor + 4)
    ]
    pkg = cache.first_available(candidates)
    root = cache.deb(pkg)
    srcs = sorted(root.glob("usr/share/doc/python3*/html/_sources"))
    if not srcs:
        raise DomainUnavailable(f"{pkg} has no html/_sources (reST) folder")
    files = [p for p in srcs[0].rglob("*.txt") if p.is_file()]
    return f"deb:{pkg}={cache.versions.get(pkg, '?')}", _file_units(srcs[0], files, "pydoc/")


def _math_latex(cache: PackageCache) -> tuple[str, list[Unit]]:
    root = cache.deb("pari-doc")
    doc = root / "usr/share/pari/doc"
    macros = {"parimacro.tex", "pdfmacs.tex", "paricfg.tex", "users.tex"}
    files = [p for p in doc.glob("*.tex") if p.name not in macros]
    if not files:
        raise DomainUnavailable(f"pari-doc has no TeX sources in {doc}")
    return f"deb:pari-doc={cache.versions.get('pari-doc', '?')}", _file_units(doc, files, "pari/")


def _german(cache: PackageCache) -> tuple[str, list[Unit]]:
    units: list[Unit] = []
    prov: list[str] = []
    errors: list[str] = []
    try:
        root = cache.deb("fortunes-de")
        fdir = root / "usr/share/games/fortunes/de"
        files = [p for p in fdir.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")]
        units += _file_units(fdir, files, "fortunes-de/")
        prov.append(f"deb:fortunes-de={cache.versions.get('fortunes-de', '?')}")
    except (DomainUnavailable, OSError) as e:
        errors.append(str(e))
    try:
        root = cache.deb("debian-reference-de")
        ddir = root / "usr/share/debian-reference"
        files = [p for p in ddir.glob("*.de.html") if p.is_file()]
        units += _file_units(ddir, files, "debian-reference-de/", lambda p: html_to_text(_read_text(p)))
        prov.append(f"deb:debian-reference-de={cache.versions.get('debian-reference-de', '?')}")
    except (DomainUnavailable, OSError) as e:
        errors.append(str(e))
    if not units:
        raise DomainUnavailable("; ".join(errors))
    return " + ".join(prov), units


def _dialogue(cache: PackageCache) -> tuple[str, list[Unit]]:
    root = cache.pypi("chitchat-dataset")
    path = root / "chitchat_dataset" / "dataset.json"
    if not path.is_file():
        raise DomainUnavailable(f"chitchat-dataset has no {path.name}")
    data = json.loads(path.read_text(encoding="utf-8"))
    units: list[Unit] = []
    for cid in sorted(data):
        speakers: dict[str, str] = {}
        lines = []
        for turn in data[cid].get("messages", []):
            for msg in turn:
                who = speakers.setdefault(
                    msg.get("sender", "?"), "AB"[len(speakers) % 2] if len(speakers) < 2 else f"S{len(speakers)}"
                )
                lines.append(f"{who}: {msg.get('text', '')}")
        if lines:
            text = "\n".join(lines) + "\n"
            units.append(_text_unit(f"chitchat#{cid}", text))
    return f"pypi:chitchat-dataset={cache.versions.get('chitchat-dataset', '?')}", units


DOMAINS: dict[str, DomainSpec] = {
    s.name: s
    for s in (
        DomainSpec(
            "novels",
            "Jane Austen's six novels (r-cran-janeaustenr, R lazy-load database); unit = chapter",
            "public domain texts; package MIT",
            _novels,
        ),
        DomainSpec(
            "encyclopedia",
            "Free On-line Dictionary of Computing (dict-foldoc, dictd); unit = entry",
            "GFDL-1.1+ (FOLDOC)",
            _encyclopedia,
        ),
        DomainSpec("python", "the interpreter's own standard library (*.py); unit = file", "PSF-2.0", _python_code),
        DomainSpec(
            "go",
            "Go standard library sources (golang-*-src, *.go without testdata); unit = file",
            "BSD-3-Clause (Go)",
            _go_code,
        ),
        DomainSpec(
            "docs",
            "Python documentation reST sources (python3.X-doc html/_sources); unit = file",
            "PSF-2.0",
            _tech_docs,
        ),
        DomainSpec("math", "PARI/GP TeX manuals (pari-doc); unit = file", "GPL-2+ (PARI/GP)", _math_latex),
        DomainSpec(
            "german",
            "German fortunes (fortunes-de) and Debian Reference chapters (debian-reference-de); unit = file",
            "GPL-2+",
            _german,
        ),
        DomainSpec(
            "dialogue",
            "Chit-Chat Challenge conversations (PyPI chitchat-dataset); unit = conversation",
            "MIT",
            _dialogue,
        ),
    )
}
