"""File helpers shared by the corpus builder, the recipes and the ``transformers`` integration."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``<path>.tmp`` and ``os.replace``.

    A reader never sees a half-written file, and a crash leaves the old file in place.

    Returns:
        ``path`` as a ``Path``.
    """
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p


def json_fingerprint(obj: Any) -> str:
    """Short stable hash (16 hex digits of SHA-256) of ``obj``'s sorted-key JSON; keys caches."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
