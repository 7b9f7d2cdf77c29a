"""Tests of ddk/recipes/demo.py: the pretrained demo students and ``make demo``'s KD-vs-DDK comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_cases import demo_cfg, own_models
from recipe_cases import flip_bit as _flip_bit
from transformers import AutoModelForCausalLM


def test_student_mixture_uniform_and_skewed() -> None:
    from ddk.recipes.config import make_config
    from ddk.recipes.demo import student_mixture

    names = ["code", "math", "prose", "web"]
    assert student_mixture(make_config(student_start="uniform"), names) is None
    w = student_mixture(make_config(student_start="skewed", scarce_domains=("math", "web"), scarce_share=0.25), names)
    assert w == pytest.approx([0.4, 0.1, 0.4, 0.1], rel=1e-15)
    with pytest.raises(
        ValueError, match=r"scarce_domains must be some, not all, of the corpus's domains .* \(unknown: \['law'\]\)"
    ):
        student_mixture(make_config(student_start="skewed", scarce_domains=("law",)), names)
    with pytest.raises(ValueError, match=r"student_start must be one of \('random', 'uniform', 'skewed'\)"):
        make_config(student_start="pretrained")
    with pytest.raises(ValueError, match=r"scarce_share must be in \(0, 1\]"):
        make_config(scarce_share=0.0)


def test_pretrained_students_learn_their_mixture_and_are_cached(tmp_path: Path) -> None:
    from ddk.recipes.demo import demo_config

    _, _, corpus = own_models(tmp_path)
    kw = dict(student_pretrain_steps=30, teacher_lr=3e-3, checkpoint_every=100)
    random_ = demo_config(demo_cfg(tmp_path, corpus, student_start="random", **kw))
    uniform = demo_config(demo_cfg(tmp_path, corpus, student_start="uniform", **kw))
    skewed = demo_config(
        demo_cfg(tmp_path, corpus, student_start="skewed", scarce_domains=("math",), scarce_share=0.05, **kw)
    )
    assert len({random_.student, uniform.student, skewed.student}) == 3
    assert uniform.teacher == skewed.teacher == random_.teacher  # one teacher for every start
    assert demo_config(demo_cfg(tmp_path, corpus, student_start="uniform", **kw)).student == uniform.student  # cached
    mu = json.loads(Path(uniform.student, "demo_meta.json").read_text())
    ms = json.loads(Path(skewed.student, "demo_meta.json").read_text())
    assert json.loads(Path(random_.student, "demo_meta.json").read_text())["start"] == "random"
    assert mu["mixture"] == pytest.approx({"code": 1 / 3, "math": 1 / 3, "prose": 1 / 3})
    assert ms["mixture"]["math"] == pytest.approx(0.05 / 2.05)
    log_v = math.log(320)
    assert all(c < log_v - 0.3 for c in mu["validation_ce"].values())  # pretraining learned something everywhere
    # the skewed student lags on its scarce domain relative to the uniform one, more than elsewhere
    lag = {d: ms["validation_ce"][d] - mu["validation_ce"][d] for d in mu["validation_ce"]}
    assert lag["math"] > max(lag["code"], lag["prose"])
    model = AutoModelForCausalLM.from_pretrained(uniform.student)
    assert not torch.equal(
        model.model.embed_tokens.weight, AutoModelForCausalLM.from_pretrained(random_.student).model.embed_tokens.weight
    )


def test_compare_demo_distills_the_same_student_with_kd_and_ddk(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from ddk.recipes.demo import compare_demo

    _, _, corpus = own_models(tmp_path)
    cfg = demo_cfg(tmp_path, corpus, out=str(tmp_path / "runs" / "compare"))
    result = compare_demo(cfg, preset="unit")
    out = capsys.readouterr().out
    root = tmp_path / "runs" / "compare"
    kd, ddk = result["methods"]["kd"], result["methods"]["ddk"]
    assert kd["tokens"] == ddk["tokens"] and kd["teacher_ce"] == ddk["teacher_ce"]
    assert result["difference"]["gap"] == pytest.approx([a - b for a, b in zip(ddk["gap"], kd["gap"])], rel=1e-12)
    assert result["difference"]["mean_gap"] == pytest.approx(ddk["mean_gap"] - kd["mean_gap"], rel=1e-12)
    for m in ("kd", "ddk"):
        cfg_m = json.loads((root / m / "config.json").read_text())
        assert (
            cfg_m["method"] == m
            and cfg_m["student"] == json.loads((root / "kd" / "config.json").read_text())["student"]
        )
    assert (root / "compare.png").is_file() and (root / "ddk" / "weights.png").is_file()
    assert "== demo (preset 'unit'): KD vs DDK from the same student ==" in out and "DDK - KD" in out
    assert "CE-pretrained 6 steps on the uniform mixture" in out
    assert (root / "comparison.txt").read_text().strip() in out
    # a second run redoes both methods (no stale summaries), with the same result
    again = compare_demo(cfg, preset="unit")
    assert again["methods"]["ddk"]["gap"] == ddk["gap"]


def test_demo_model_cache_with_flipped_weights_or_garbage_meta_is_rebuilt(tmp_path, capsys):
    from hf_models import make_model, make_tokenizer

    from ddk.recipes.demo import _cached_model, _save_model

    folder = tmp_path / "teacher"
    _save_model(make_model("llama", 300), make_tokenizer(tmp_path / "tok"), folder, {"train_seconds": 1.0})
    assert _cached_model(folder, "teacher") is not None
    _flip_bit(folder / "model.safetensors")
    assert _cached_model(folder, "teacher") is None
    assert "model.safetensors is missing or changed since it was saved" in capsys.readouterr().err
    (folder / "demo_meta.json").write_text("{garbage")
    assert _cached_model(folder, "teacher") is None
    assert "its demo_meta.json is unreadable (JSONDecodeError" in capsys.readouterr().err
