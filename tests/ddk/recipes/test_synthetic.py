"""The synthetic recipe behind `make demo`, end to end on a tiny configuration."""

from __future__ import annotations

import json
from pathlib import Path

from ddk.recipes.synthetic import SyntheticConfig, make_domains, run


def test_make_domains_deterministic_and_in_blocks() -> None:
    cfg = SyntheticConfig(train_seqs_per_domain=20, val_seqs_per_domain=4, seq_len=9)
    a, va, names = make_domains(cfg)
    b, vb, _ = make_domains(cfg)
    assert a.equal(b) and all(x.equal(y) for x, y in zip(va, vb))
    assert a.shape == (20 * len(names), 9)
    lo = 0
    for d, k in enumerate(cfg.domain_tokens):
        block = a[d * 20 : (d + 1) * 20]
        assert lo <= int(block.min()) and int(block.max()) < lo + k
        lo += k


def test_run_tiny_writes_logs_and_moves_weights(tmp_path: Path) -> None:
    cfg = SyntheticConfig(
        train_seqs_per_domain=64,
        val_seqs_per_domain=8,
        seq_len=9,
        teacher_steps=30,
        student_pretrain_steps=10,
        student_steps=20,
        batch_size=16,
        interval=5,
    )
    results = run(cfg, out_dir=tmp_path, progress=False)
    assert [r["method"] for r in results] == ["kd", "ddk"]
    kd, ddk_run = results
    assert all(abs(w - 0.25) < 1e-12 for w in kd["final_weights"])
    assert abs(sum(ddk_run["final_weights"]) - 1.0) < 1e-9
    assert max(ddk_run["final_weights"]) > 0.26  # DDK moved away from uniform
    records = [json.loads(line) for line in (tmp_path / "ddk.metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 + 20 // 5
    assert json.loads((tmp_path / "summary.json").read_text())[1]["method"] == "ddk"
