"""Tests of ``ddk.data.mapped``: arrays in files read on demand, with at most ``MAX_OPEN`` files
mapped (and so descriptors held) however many arrays are open."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from ddk.data import mapped
from ddk.data.mapped import MappedRows, open_npy

needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_mapped_rows_reads_like_the_array(tmp_path: Path) -> None:
    a = np.arange(5 * 3, dtype="<i4").reshape(5, 3)
    path = tmp_path / "a.bin"
    path.write_bytes(b"\0" * 7 + a.tobytes())  # at an offset, as a .npy header puts it
    rows = MappedRows(path, (5, 3), "<i4", offset=7)
    assert rows.shape == (5, 3) and rows.ndim == 2 and len(rows) == 5 and rows.dtype == np.int32
    assert rows.size == 15 and rows.nbytes == 60
    np.testing.assert_array_equal(rows[1], a[1])
    np.testing.assert_array_equal(rows[1:4], a[1:4])
    np.testing.assert_array_equal(rows[[4, 0]], a[[4, 0]])
    assert rows[2, 1] == a[2, 1] and not isinstance(rows[2, 1], np.ndarray)
    np.testing.assert_array_equal(np.asarray(rows), a)
    assert np.asarray(rows, dtype=np.int64).dtype == np.int64
    got = rows[0:2]
    assert type(got) is np.ndarray and got.base is None  # a copy: no view keeps the map
    clone = pickle.loads(pickle.dumps(rows))  # a DataLoader worker gets the file's name, not its contents
    assert len(pickle.dumps(rows)) < 600 and repr(clone) == repr(rows)
    np.testing.assert_array_equal(clone[3], a[3])
    big = rows.memmap()
    assert isinstance(big, np.memmap) and big.sum() == a.sum()


@needs_proc
def test_mapped_rows_hold_at_most_max_open_descriptors(tmp_path: Path) -> None:
    n = mapped.MAX_OPEN * 4
    for i in range(n):
        np.full((2, 4), i, dtype="<i4").tofile(tmp_path / f"f{i}.bin")
    before = _fds()
    arrays = [MappedRows(tmp_path / f"f{i}.bin", (2, 4), "<i4") for i in range(n)]
    assert _fds() == before  # opening holds nothing
    for _ in range(2):
        for i, rows in enumerate(arrays):
            assert int(rows[1, 2]) == i
            assert _fds() <= before + mapped.MAX_OPEN
    # a plain np.memmap per file would hold one descriptor each
    maps = [np.memmap(tmp_path / f"f{i}.bin", dtype="<i4", mode="r") for i in range(mapped.MAX_OPEN + 8)]
    assert _fds() > before + mapped.MAX_OPEN
    del maps


def test_mapped_rows_of_a_replaced_or_short_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    np.arange(8, dtype="<i4").tofile(path)
    with pytest.raises(ValueError, match=re.escape(f"MappedRows: {path} must hold 36 bytes (shape (3, 3)); got 32.")):
        MappedRows(path, (3, 3), "<i4")
    rows = MappedRows(path, (4, 2), "<i4")
    other = tmp_path / "b.bin"
    np.arange(8, 16, dtype="<i4").tofile(other)
    os.replace(other, path)  # another inode where the cache had its file
    with pytest.raises(
        ValueError,
        match=re.escape(f"MappedRows: {path} changed after it was opened (replaced or modified); open it again."),
    ):
        rows[0]
    assert MappedRows(path, (4, 2), "<i4")[0].tolist() == [8, 9]  # opened again: the new file


def test_open_npy_reads_the_header_and_refuses_other_files(tmp_path: Path) -> None:
    a = np.linspace(0, 1, 24, dtype=np.float16).reshape(2, 3, 4)
    np.save(tmp_path / "a.npy", a)
    rows = open_npy(tmp_path / "a.npy")
    assert rows.shape == (2, 3, 4) and rows.dtype == np.float16
    np.testing.assert_array_equal(rows[1], a[1])
    (tmp_path / "b.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(ValueError, match=re.escape(f"open_npy: {tmp_path / 'b.npy'} must be a .npy file")):
        open_npy(tmp_path / "b.npy")
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((2, 3))))
    with pytest.raises(ValueError, match="must hold a C-order array of numbers; got fortran=True"):
        open_npy(tmp_path / "f.npy")
