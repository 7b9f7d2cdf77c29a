"""File helpers shared by the corpus builder, the recipes and the ``transformers`` integration.

* :func:`atomic_write_text` / :func:`atomic_write_bytes`: a unique temporary name in the target's
  folder, ``fsync`` of the file, ``os.replace``, ``fsync`` of the folder: a reader sees the old
  file or the new one, never a torn one, also with several writers and after a power cut.
* :func:`folder_lock`: one writer per folder (an advisory ``fcntl.flock`` on ``<folder>/.lock``,
  which holds the owner's pid); a second writer gets an error naming that pid (or waits).
* :func:`open_nofollow` / :func:`append_line` / :func:`fresh_dir` / :func:`refuse_link`: no write
  leaves its folder through a symbolic link: files are opened with ``O_NOFOLLOW``, temporary names
  are ``lstat``-checked, and a link where ddk writes is an error naming it.
* :func:`is_disk_full` / :func:`disk_full_message`: a full disk (``ENOSPC``, ``EDQUOT``) reported
  as an error naming the folder.
* :func:`safe_name` / :func:`child_path`: names that become file names (domains, runs) are
  checked, and every such path is resolved inside its folder; :func:`printable` escapes a name's
  control characters wherever it is printed.
* :func:`file_sha256`, :func:`json_fingerprint`: digests.
* :func:`read_json` / :func:`loads_json`: JSON read back under a size and a nesting cap.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "JSONLimitError",
    "append_line",
    "atomic_write_bytes",
    "atomic_write_text",
    "child_path",
    "disk_full_message",
    "file_sha256",
    "folder_lock",
    "fresh_dir",
    "fsync_dir",
    "fsync_file",
    "is_disk_full",
    "warn_user",
    "json_depth",
    "json_fingerprint",
    "loads_json",
    "read_capped",
    "read_json",
    "open_nofollow",
    "printable",
    "refuse_link",
    "safe_name",
]

LOCK_NAME = ".lock"


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s data to the disk (``os.fsync``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename inside it) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    """``0o666`` less this process's umask: the mode ``open()`` would give a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # read once, at import (os.umask can only be read by setting it)
DIR_MODE = FILE_MODE | ((FILE_MODE & 0o444) >> 2)  # the mode mkdir() gives: x wherever r


# ---------------------------------------------------------------------------- no writes through links
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows: the lstat checks below still hold
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _link_error(fn: str, path: Path) -> ValueError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return ValueError(
        f"{fn}: {path} must not be a symbolic link (ddk writes only inside its folders, never through a "
        f"link); got a link to {target!r}. Remove the link (or use another folder) and rerun."
    )


def refuse_link(path: str | os.PathLike[str], fn: str = "ddk") -> Path:
    """``path`` as a ``Path``, unless its final name is a symbolic link: then a ``ValueError`` naming it."""
    p = Path(path)
    if os.path.islink(p):
        raise _link_error(fn, p)
    return p


def _open_fd(path: str | os.PathLike[str], flags: int, fn: str) -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, 0o666)`` (mode under the umask); a link is the error naming it."""
    p = refuse_link(path, fn)
    try:
        return os.open(p, flags | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(p):  # a link planted since the check
            raise _link_error(fn, p) from None
        raise


def open_nofollow(path: str | os.PathLike[str], mode: str = "a", *, fn: str = "ddk") -> IO[Any]:
    """Open ``path`` for writing without following a symbolic link at its final name.

    Args:
        path: the file (created if missing, with ``open()``'s mode under the umask).
        mode: ``"a"``/``"ab"`` (append) or ``"w"``/``"wb"`` (truncate); text modes are UTF-8.
        fn: the function named in errors.

    Raises:
        ValueError: ``path`` is a symbolic link (dangling or not); the message names it.
    """
    if mode not in ("a", "ab", "w", "wb"):
        raise ValueError(f"open_nofollow: mode must be one of 'a', 'ab', 'w', 'wb'; got {mode!r}.")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode[0] == "a" else os.O_TRUNC)
    fd = _open_fd(path, flags, fn)
    if "b" in mode:
        return os.fdopen(fd, mode)
    return os.fdopen(fd, mode, encoding="utf-8")


def append_line(path: str | os.PathLike[str], line: str, *, fn: str = "ddk") -> None:
    """Append ``line`` and a newline to ``path`` in one write, without following a link (:func:`open_nofollow`)."""
    with open_nofollow(path, "a", fn=fn) as f:
        f.write(line + "\n")


def fresh_dir(path: str | os.PathLike[str], fn: str = "ddk") -> Path:
    """An empty folder at ``path`` (a leftover one removed first); a symbolic link there is the error naming it."""
    p = refuse_link(path, fn)
    if p.exists():
        shutil.rmtree(p)
    os.mkdir(p)  # never follows: a link planted since the check makes it fail (FileExistsError)
    return p


# ---------------------------------------------------------------------------- a full disk
_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk or an exhausted quota (``ENOSPC``, ``EDQUOT``)."""
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def disk_full_message(fn: str, arg: str, folder: str | os.PathLike[str], exc: BaseException, then: str = "") -> str:
    """The house-format message of a full disk under ``folder`` (the ``arg`` a user passed)."""
    return (
        f"{fn}: {arg} must be on a disk with free space; got no space left while writing {str(folder)!r} "
        f"({type(exc).__name__}: {exc}). Free space (or pass another {arg}) and rerun the same command"
        f"{': ' + then if then else '.'}"
    )


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a unique temporary file, ``fsync`` and ``os.replace``.

    Two writers never share a temporary file; a reader never sees a half-written file; a crash
    leaves the old file (and at most a stray ``.<name>.*.tmp``, never read). A symbolic link at
    ``path`` is an error naming it (it is never replaced or written through).

    Returns:
        ``path`` as a ``Path``.
    """
    p = refuse_link(path, "atomic_write")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)  # O_EXCL: a new file
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # mkstemp's 0600 would hide the file from a teammate
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        refuse_link(tmp, "atomic_write")
        os.replace(tmp, refuse_link(p, "atomic_write"))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)
    return p


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (see :func:`atomic_write_bytes`).

    Returns:
        ``path`` as a ``Path``.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read into one 4 MiB buffer: a file of any size costs 4 MiB)."""
    sha = hashlib.sha256()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            sha.update(view[:n])
    return sha.hexdigest()


def json_fingerprint(obj: Any) -> str:
    """Short stable hash (16 hex digits of SHA-256) of ``obj``'s sorted-key JSON; keys caches."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- bounded JSON reads
class JSONLimitError(ValueError):
    """A JSON file or text over :func:`read_json`'s size or nesting cap; the message names it and the cap."""


#: default cap of :func:`read_json`: ddk's own small JSON files (configs, manifests, summaries) are far below
JSON_MAX_BYTES = 64 << 20
#: default nesting cap of :func:`read_json` / :func:`loads_json`: ddk's deepest own file, a
#: checkpoint's ``state.json``, nests about 10 deep
JSON_MAX_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_depth(data: str | bytes) -> int:
    """How deep ``[`` and ``{`` nest in the JSON text ``data`` (strings skipped), in one vectorised
    pass without parsing: deep nesting is then refused before ``json`` or a recursive reader can
    hit Python's recursion limit. UTF-8 (a ``"`` or ``\\`` byte is always that character)."""
    import numpy as np

    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    arr = np.frombuffer(_JSON_STRING.sub(b"", raw), dtype=np.uint8)
    opens = (arr == ord("[")) | (arr == ord("{"))
    closes = (arr == ord("]")) | (arr == ord("}"))
    steps = opens[opens | closes].astype(np.int64) * 2 - 1  # +1 per opening, -1 per closing bracket
    return int(np.cumsum(steps).max()) if steps.size else 0


def loads_json(
    data: str | bytes, *, max_depth: int = JSON_MAX_DEPTH, where: str = "the JSON text", fn: str = "ddk"
) -> Any:
    """``json.loads(data)`` for JSON nested at most ``max_depth`` deep (checked first, see :func:`json_depth`).

    Raises:
        JSONLimitError: nested deeper (a ``ValueError``; the message names ``where``).
        ValueError: not JSON (``json.JSONDecodeError``).
    """
    depth = json_depth(data)
    if depth > max_depth:
        raise JSONLimitError(
            f"{fn}: {where} must be JSON nested at most {max_depth} deep; got {depth} levels "
            "(not a file ddk wrote: restore or remove it)."
        )
    return json.loads(data)


def read_json(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = JSON_MAX_BYTES,
    max_depth: int = JSON_MAX_DEPTH,
    fn: str = "ddk",
) -> Any:
    """The JSON value of the UTF-8 file ``path``, read only if it holds at most ``max_bytes`` bytes
    and nests at most ``max_depth`` deep: a crafted or runaway file is an error naming it, never a
    parse that takes gigabytes or a ``RecursionError``.

    Raises:
        OSError: the file cannot be read (e.g. ``FileNotFoundError``).
        JSONLimitError: over either cap (a ``ValueError``; the message names the file and the cap).
        ValueError: not UTF-8 JSON (``UnicodeDecodeError``, ``json.JSONDecodeError``).
    """
    return loads_json(read_capped(path, max_bytes=max_bytes, fn=fn), max_depth=max_depth, where=str(path), fn=fn)


def read_capped(path: str | os.PathLike[str], *, max_bytes: int = JSON_MAX_BYTES, fn: str = "ddk") -> bytes:
    """The bytes of the file ``path``, read only if it holds at most ``max_bytes`` (the bytes a
    caller both hashes and parses, e.g. a cache manifest).

    Raises:
        OSError: the file cannot be read.
        JSONLimitError: larger than ``max_bytes`` (a ``ValueError`` naming the file and the cap).
    """
    p = Path(path)
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(max_bytes + 1) if size <= max_bytes else b""
    if size > max_bytes or len(raw) > max_bytes:
        raise JSONLimitError(
            f"{fn}: {p} must be a JSON file of at most {max_bytes} bytes; got {max(size, len(raw))} bytes "
            "(not a file ddk wrote: restore or remove it)."
        )
    return raw


# ---------------------------------------------------------------------------- names
def _name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "be a non-empty string"
    if name in (".", ".."):
        return "not be '.' or '..'"
    if name.startswith("."):
        return "not start with '.'"
    for ch, label in (("/", "'/'"), ("\\", "'\\\\'"), ("\x00", "NUL")):
        if ch in name:
            return f"not contain {label} (it names a folder)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "not contain control characters"
    if len(name.encode("utf-8")) > 200:
        return "be at most 200 bytes long"
    return None


def printable(name: str) -> str:
    """``name`` as printed to a terminal or a log: itself when every character is printable, else
    its ``repr`` (control characters escaped, e.g. ``'a\\x1b[2Jb'``), so a name never moves the cursor."""
    return name if name.isprintable() else repr(name)


def safe_name(fn: str, arg: str, name: object, hint: str = "") -> str:
    """``name`` if it can name one file or folder (no separator, no ``..``, no leading ``.``,
    no control character, at most 200 bytes), else the house-format ``ValueError``."""
    problem = _name_problem(name)
    if problem is not None:
        raise ValueError(f"{fn}: {arg} must {problem}; got {name!r}.{' ' + hint if hint else ''}")
    assert isinstance(name, str)  # _name_problem rejects every non-str
    return name


def child_path(fn: str, arg: str, folder: str | os.PathLike[str], name: object, hint: str = "") -> Path:
    """``folder / name`` for a :func:`safe_name`, checked to resolve inside ``folder``."""
    p = Path(folder) / safe_name(fn, arg, name, hint)
    base = Path(folder).resolve()
    if p.resolve().parent != base:  # e.g. a symbolic link that points elsewhere
        raise ValueError(
            f"{fn}: {arg} must name a path inside {str(base)!r}; got {name!r} (resolves to {str(p.resolve())!r})."
        )
    return p


# ---------------------------------------------------------------------------- locks
_HELD: dict[str, list[Any]] = {}  # resolved folder -> [open lock file, depth]: re-entrant in one process
_HELD_GUARD = threading.Lock()


def _holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike[str], fn: str, arg: str, *, wait: bool = False, hint: str = ""
) -> Iterator[Path]:
    """Hold the advisory lock of ``folder`` (created if missing) for the ``with`` block.

    The lock is ``fcntl.flock`` on ``<folder>/.lock``, which holds the owner's pid; the kernel
    drops it when the owner exits, also by SIGKILL, so a crash never leaves a stale lock. The
    same process may nest the lock (the demo locks its run folder, then ``distill`` does).

    Args:
        folder: the folder to own.
        fn, arg: the function and argument named in errors.
        wait: block until the holder lets go (caches) instead of raising (run folders).
        hint: appended to the error (what to do).

    Raises:
        ValueError: the folder cannot be created or written, or (``wait=False``) another process
            holds it; the message names the holder's pid.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = str(folder.resolve())
        lock_file = folder / LOCK_NAME
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:
                held[1] += 1
        if held is None:  # O_NOFOLLOW: a .lock link never gets its target truncated
            f = os.fdopen(_open_fd(lock_file, os.O_RDWR | os.O_CREAT, fn), "r+", encoding="utf-8")
    except OSError as exc:
        raise ValueError(
            f"{fn}: {arg} must be a folder this process can write; got {str(folder)!r} "
            f"({type(exc).__name__}: {exc}). Pass another {arg} or fix its permissions."
        ) from None
    if held is not None:
        try:
            yield folder
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    try:
        _acquire(f, lock_file, fn, arg, folder, wait, hint)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        with _HELD_GUARD:
            _HELD[key] = [f, 1]
        try:
            yield folder
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
    finally:
        f.close()  # closing the file releases the lock


def _acquire(f: Any, lock_file: Path, fn: str, arg: str, folder: Path, wait: bool, hint: str) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks; one writer is then the user's job
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        who = _holder(lock_file)
    if not wait:
        raise ValueError(
            f"{fn}: {arg} must not be in use by another process; got {str(folder)!r} locked by {who} "
            f"({lock_file}).{' ' + hint if hint else ''}"
        )
    print(f"{fn}: waiting for {who}, which is writing {folder}", file=sys.stderr, flush=True)
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str) -> None:
    """``warnings.warn(message)`` attributed to the first caller outside ``ddk`` (the user's line,
    not a line of ddk: Python's default display prints that line's source under the message)."""
    import warnings

    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
