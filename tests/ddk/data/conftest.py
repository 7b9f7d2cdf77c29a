"""Fixtures of the packing tests: one tokenizer and one small 3-domain corpus per module."""

from __future__ import annotations

from typing import Any

import pytest

datasets = pytest.importorskip("datasets")

from hf_models import make_tokenizer, write_jsonl  # noqa: E402

from ddk.data.records import load_records  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = write_jsonl(tmp_path_factory.mktemp("corpus") / "c.jsonl", docs_per_domain=20, words=12)
    return load_records(path, progress=False)
