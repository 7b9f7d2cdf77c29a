"""Every code example of the README runs as printed: each Python block as a script of its own,
and the ``ddk distill --teacher`` command lines, in a folder holding the user's models and corpus
the examples name (``my-teacher``: a Qwen2 teacher with 8 padding rows, ``my-student``,
``my_corpus.jsonl``; see ``doc_examples``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from doc_examples import (
    ROOT,
    code_blocks,
    command_lines,
    distill_commands,
    make_user_folder,
    python_blocks,
    run_command,
    run_python,
)

README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = [b.text for b in python_blocks(README)]
COMMANDS = distill_commands(README)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_user_folder(tmp_path_factory.mktemp("readme"))


def test_readme_has_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 2 and len(COMMANDS) >= 1


@pytest.mark.e2e
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_example_runs_as_printed(workdir: Path, index: int) -> None:
    run_python(PYTHON_BLOCKS[index], workdir, f"example_{index}.py")


@pytest.mark.e2e
@pytest.mark.parametrize("index", range(len(COMMANDS)))
def test_readme_distill_command_runs_as_printed_and_the_student_loads(workdir: Path, index: int) -> None:
    run_command(COMMANDS[index], workdir)
    argv = COMMANDS[index].split()
    out = workdir / argv[argv.index("--out") + 1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(str(out / "student")).config.model_type == "qwen2"
    assert len(AutoTokenizer.from_pretrained(str(out / "student"))) > 0


CACHE_COMMANDS = [
    line
    for b in code_blocks(README)
    if b.lang == "bash" and b.not_executed is None
    for line in command_lines(b)
    if line.startswith(("ddk teacher-cache", "ddk distill --student"))
]


@pytest.mark.e2e
def test_readme_teacher_cache_commands_run_in_order_without_the_teacher(workdir: Path) -> None:
    assert [c.split()[1] for c in CACHE_COMMANDS] == ["teacher-cache", "distill"]
    for command in CACHE_COMMANDS:
        run_command(command, workdir)
    summary = json.loads((workdir / "cached-run" / "summary.json").read_text())
    assert summary["teacher_params"] == 0 and summary["method"] == "ddk"
