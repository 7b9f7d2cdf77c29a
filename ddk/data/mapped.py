"""Arrays in files, memory-mapped on demand: what the caches hand out instead of one ``np.memmap``
(and so one open file descriptor) per file.

An ``np.memmap`` holds a duplicate of its file's descriptor for as long as it lives, so a cache of
``D`` domains kept open as memmaps holds ``2 D`` (packed sequences) or ``10 D`` (teacher cache)
descriptors, and a few hundred domains exhaust the common limit of 1024. A :class:`MappedRows`
holds only the file's name, offset, shape, dtype and identity; reading it maps the file through a
process-wide cache of at most ``MAX_OPEN`` maps (least recently used closed first) and returns a
copy, so no view keeps a map (and its descriptor) alive. Descriptors in use are then at most
``MAX_OPEN`` whatever the number of domains.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAX_OPEN", "MappedRows", "Rows", "open_npy"]

#: most files this process keeps memory-mapped at once (each map holds one descriptor)
MAX_OPEN = 64

_Key = tuple[str, int, int, int, int]
_OPEN: OrderedDict[_Key, np.ndarray] = OrderedDict()
_LOCK = threading.Lock()


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


class MappedRows:
    """A read-only array of ``shape`` and ``dtype`` stored at ``offset`` bytes into ``path``.

    It reads like the ``np.memmap`` it replaces (``shape``, ``dtype``, ``ndim``, ``len``,
    indexing, ``np.asarray``), but indexing returns an ``np.ndarray`` copy and no file descriptor
    is held between reads. The file's identity (device, inode, mtime) is taken at construction: a
    read after the file was replaced or modified raises ``ValueError`` naming it.

    Args:
        path: the file.
        shape: the array's shape (C order).
        dtype: its dtype (e.g. ``"<i4"``).
        offset: bytes before the array's first element (a ``.npy`` header).

    Raises:
        ValueError: the file is shorter than ``offset`` plus the array.

    Examples:
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "rows.bin")
        >>> np.arange(6, dtype="<i4").tofile(path)
        >>> rows = MappedRows(path, (3, 2), "<i4")
        >>> rows.shape, len(rows), rows[1].tolist(), np.asarray(rows).sum()
        ((3, 2), 3, [2, 3], np.int64(15))
    """

    __slots__ = ("_ident", "_key", "dtype", "offset", "path", "shape")

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, ...], dtype: Any, offset: int = 0) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.offset = int(offset)
        st = os.stat(self.path)
        need = self.offset + self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))
        if st.st_size < need:
            raise ValueError(f"MappedRows: {self.path} must hold {need} bytes (shape {self.shape}); got {st.st_size}.")
        self._ident = _identity(st)
        self._key: _Key = (str(self.path), self.offset, *self._ident)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def memmap(self) -> np.ndarray:
        """A fresh ``np.memmap`` of the whole array (one descriptor, released with it), for a pass
        over all of it; an empty array needs no file."""
        if self.size == 0:
            return np.empty(self.shape, dtype=self.dtype)
        with open(self.path, "rb") as f:
            if _identity(os.fstat(f.fileno())) != self._ident:
                raise ValueError(
                    f"MappedRows: {self.path} changed after it was opened (replaced or modified); open it again."
                )
            return np.memmap(f, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)

    def _mapped(self) -> np.ndarray:
        with _LOCK:
            m = _OPEN.get(self._key)
            if m is not None:
                _OPEN.move_to_end(self._key)
                return m
        m = self.memmap()
        with _LOCK:
            _OPEN[self._key] = m
            while len(_OPEN) > MAX_OPEN:
                _OPEN.popitem(last=False)  # its descriptor closes with the last reference
        return m

    def __getitem__(self, index: Any) -> np.ndarray:
        """``array[index]`` as an ``np.ndarray`` (a copy: no view outlives the read) or a scalar."""
        value = self._mapped()[index]
        return np.array(value, copy=True) if isinstance(value, np.ndarray) else value

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.array(self._mapped(), copy=True)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def __repr__(self) -> str:
        return f"MappedRows({str(self.path)!r}, shape={self.shape}, dtype={self.dtype.str!r}, offset={self.offset})"


#: an array of rows as the caches hand it out: in memory, or in a file read on demand
Rows = np.ndarray | MappedRows


def open_npy(path: str | os.PathLike[str]) -> MappedRows:
    """The array of the ``.npy`` file ``path`` as :class:`MappedRows` (its header read and closed).

    Raises:
        ValueError: not a ``.npy`` file of a plain C-order array, or shorter than its header says.
    """
    p = Path(path)
    with p.open("rb") as f:
        fmt = np.lib.format
        try:
            version = fmt.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version}")
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise ValueError(f"open_npy: {p} must be a .npy file (version 1.0 or 2.0); got {e}.") from None
        offset = f.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"open_npy: {p} must hold a C-order array of numbers; got fortran={fortran}, dtype {dtype}.")
    return MappedRows(p, shape, dtype, offset)
