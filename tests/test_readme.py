"""Every code example of the README runs as printed: the Python blocks, and the ``ddk distill``
command lines, in a folder holding the user's models and corpus the examples name
(``my-teacher``: a Qwen2 teacher with 8 padding rows, ``my-student``, ``my_corpus.jsonl``)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from hf_models import make_pair, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
COMMANDS = [line for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
            for line in block.splitlines() if line.startswith("ddk distill --teacher")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    teacher, student = make_pair(root / "models", "qwen2")
    shutil.move(str(teacher), str(root / "my-teacher"))
    shutil.move(str(student), str(root / "my-student"))
    write_jsonl(root / "my_corpus.jsonl", docs_per_domain=60)
    return root


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def test_readme_has_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 2 and len(COMMANDS) >= 1


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_example_runs_as_printed(workdir: Path, index: int) -> None:
    script = workdir / f"example_{index}.py"
    script.write_text(PYTHON_BLOCKS[index])
    _run([sys.executable, str(script)], workdir)


@pytest.mark.parametrize("index", range(len(COMMANDS)))
def test_readme_distill_command_runs_as_printed_and_the_student_loads(workdir: Path, index: int) -> None:
    argv = shlex.split(COMMANDS[index])
    _run([sys.executable, "-m", "ddk.recipes.cli", *argv[1:]], workdir)
    out = workdir / argv[argv.index("--out") + 1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(str(out / "student")).config.model_type == "qwen2"
    assert len(AutoTokenizer.from_pretrained(str(out / "student"))) > 0
