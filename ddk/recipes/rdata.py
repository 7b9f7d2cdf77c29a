"""A minimal reader of R's serialization format and lazy-load databases (``.rdx`` / ``.rdb``).

Enough of R's ``unserialize`` to read data packages such as ``r-cran-janeaustenr``: XDR binary
streams (format versions 2 and 3) of vectors (character, integer, logical, double, raw, list),
pairlists, symbols and references. Closures, environments beyond empty references, byte code
and most ALTREP classes are not supported and raise ``ValueError`` naming the type.

Layout, as written by R's ``makeLazyLoadDB``: ``name.rdx`` is a compressed serialized list
``(variables, references, compressed)`` where ``variables[[name]] = c(offset, length)`` points
into ``name.rdb``; each blob there is a 4-byte big-endian uncompressed length followed by a zlib
stream (``compressed = TRUE`` or 1), or a 5-byte header whose fifth byte says ``'Z'`` (zlib),
``'2'`` (bzip2), ``'X'`` (xz) or ``'0'`` (stored) (``compressed`` 2 or 3).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = ["RList", "read_lazyload_db", "read_rds", "unserialize"]

# SEXP type codes (R internals) and the special pseudo-types of the serializer.
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP = 9, 10, 13, 14, 15, 16
_DOTSXP, _VECSXP, _EXPRSXP, _RAWSXP = 17, 19, 20, 24
_REFSXP, _NILVALUE, _GLOBALENV, _UNBOUND, _MISSINGARG, _BASENS = 255, 254, 253, 252, 251, 250
_EMPTYENV, _BASEENV, _ALTREP = 242, 241, 238
_NA_INT = -(2**31)


class RList(list):
    """An R list / pairlist read as a Python list, with ``names`` (or None) and ``attributes``."""

    names: list[str | None] | None = None
    attributes: dict[str | None, Any]  # an untagged attribute is keyed None

    def get(self, name: str) -> Any:
        """The element called ``name`` (KeyError if absent)."""
        if self.names is None or name not in self.names:
            raise KeyError(name)
        return self[self.names.index(name)]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.b = data
        self.i = 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        if self.i + n > len(self.b):
            raise ValueError(f"unserialize: data must not end early; got {len(self.b)} bytes, needed {self.i + n}.")
        out = self.b[self.i : self.i + n]
        self.i += n
        return out

    def int32(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int32()
        if n == -1:
            hi, lo = self.int32(), self.int32()
            n = (hi << 32) + lo
        return n

    def attrs(self, flags: int) -> dict[str | None, Any]:
        if not flags & (1 << 9):
            return {}
        pl = self.item()
        return dict(zip(pl.names or [], pl)) if isinstance(pl, RList) else {}

    def item(self) -> Any:
        flags = self.int32()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in (_NILVALUE, _NILSXP, _GLOBALENV, _UNBOUND, _MISSINGARG, _BASENS, _EMPTYENV, _BASEENV):
            return None
        if t == _REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int32()
            return self.refs[idx - 1]
        if t == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if t == _CHARSXP:
            n = self.int32()
            return None if n == -1 else self.take(n).decode("utf-8", errors="replace")
        if t in (_LISTSXP, _LANGSXP, _DOTSXP):
            out = RList()
            names: list[str | None] = []
            attributes: dict[str | None, Any] = {}
            while True:  # walk the cdr chain iteratively
                if has_attr:
                    a = self.item()
                    if isinstance(a, RList):
                        attributes.update(zip(a.names or [], a))
                names.append(self.item() if has_tag else None)
                out.append(self.item())
                flags = self.int32()
                t = flags & 0xFF
                if t not in (_LISTSXP, _LANGSXP, _DOTSXP):
                    self.i -= 4
                    self.item()  # the terminating NILVALUE
                    break
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
            out.names = names if any(n is not None for n in names) else None
            out.attributes = attributes
            return out
        if t in (_VECSXP, _EXPRSXP):
            n = self.length()
            out = RList(self.item() for _ in range(n))
            out.attributes = self.attrs(flags)
            nm = out.attributes.get("names")
            out.names = list(nm) if isinstance(nm, list) else None
            return out
        if t == _STRSXP:
            n = self.length()
            vals = [self.item() for _ in range(n)]
            self.attrs(flags)
            return vals
        if t in (_INTSXP, _LGLSXP):
            n = self.length()
            raw = struct.unpack(f">{n}i", self.take(4 * n))
            self.attrs(flags)
            vals = [None if v == _NA_INT else v for v in raw]
            return [None if v is None else bool(v) for v in vals] if t == _LGLSXP else vals
        if t == _REALSXP:
            n = self.length()
            vals = list(struct.unpack(f">{n}d", self.take(8 * n)))
            self.attrs(flags)
            return vals
        if t == _CPLXSXP:
            n = self.length()
            raw = struct.unpack(f">{2 * n}d", self.take(16 * n))
            self.attrs(flags)
            return [complex(raw[2 * k], raw[2 * k + 1]) for k in range(n)]
        if t == _RAWSXP:
            n = self.length()
            data = self.take(n)
            self.attrs(flags)
            return data
        if t == _ALTREP:
            info = self.item()
            state = self.item()
            self.item()  # attributes
            cls = info[0] if isinstance(info, list) and info else None
            if cls in ("wrap_string", "wrap_integer", "wrap_real", "wrap_logical", "wrap_list") and isinstance(
                state, list
            ):
                return state[0]
            if cls == "compact_intseq" and isinstance(state, list) and state:
                n, start, step = (int(x) for x in state[0][:3])
                return list(range(start, start + n * step, step))
            raise ValueError(f"unserialize: ALTREP class must be one of wrap_*, compact_intseq; got {cls!r}.")
        raise ValueError(f"unserialize: SEXP type must be a vector, pairlist or symbol; got type code {t}.")


def unserialize(data: bytes) -> Any:
    """Decode one R-serialized object (XDR format ``X\\n``, versions 2-3).

    Args:
        data: the serialized bytes (already decompressed).

    Returns:
        Python values: ``list[str | None]`` for character vectors, ``list[int | None]``,
        ``list[bool | None]``, ``list[float]``, ``bytes`` for raw, ``RList`` for lists/pairlists.
    """
    if data[:2] != b"X\n":
        raise ValueError(f"unserialize: data must start with the XDR header b'X\\n'; got {data[:2]!r}.")
    r = _Reader(data)
    r.i = 2
    version = r.int32()
    r.int32()
    r.int32()
    if version == 3:
        r.take(r.int32())  # native encoding
    elif version != 2:
        raise ValueError(f"unserialize: format version must be 2 or 3; got {version}.")
    return r.item()


def _decompress_blob(blob: bytes, compressed: int) -> bytes:
    if compressed in (2, 3):
        kind = blob[4:5]
        body = blob[5:]
        if kind == b"Z":
            return zlib.decompress(body)
        if kind == b"2":
            return bz2.decompress(body)
        if kind == b"X":
            return lzma.decompress(body)
        if kind == b"0":
            return body
        raise ValueError(f"read_lazyload_db: blob compression must be Z, 2, X or 0; got {kind!r}.")
    if compressed:
        return zlib.decompress(blob[4:])
    return blob


def read_rds(path: str | Path) -> Any:
    """Read an ``.rds`` file (gzip, bzip2, xz or uncompressed serialization)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    elif raw[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(raw)
    return unserialize(raw)


def read_lazyload_db(base: str | Path) -> dict[str, Any]:
    """Read every variable of a lazy-load database ``base.rdx`` / ``base.rdb``.

    Args:
        base: path without extension, e.g. ``.../janeaustenr/data/Rdata``.

    Returns:
        ``name -> value`` (see ``unserialize`` for the value types).
    """
    base = Path(base)
    rdx, rdb = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    for p in (rdx, rdb):
        if not p.is_file():
            raise ValueError(f"read_lazyload_db: base must name an existing .rdx/.rdb pair; got missing {str(p)!r}.")
    index = read_rds(rdx)
    if not isinstance(index, RList):
        raise ValueError(f"read_lazyload_db: {rdx} must hold an R list; got {type(index).__name__}.")
    variables = index.get("variables")
    compressed_v = index.get("compressed") if index.names and "compressed" in index.names else [1]
    compressed = int(compressed_v[0]) if isinstance(compressed_v, list) and compressed_v else 1
    data = rdb.read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, length) in zip(variables.names or [], variables):
        blob = data[int(offset) : int(offset) + int(length)]
        out[str(name)] = unserialize(_decompress_blob(blob, compressed))
    return out
