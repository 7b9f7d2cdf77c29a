"""Support for the tests that run documentation examples as printed (README.md and docs/).

The examples name a user's models and corpus: ``my-teacher`` (a Qwen2 causal LM whose vocabulary
has 8 padding rows, as Qwen's teachers do), ``my-student`` (a smaller Qwen2 with the tokenizer)
and ``my_corpus.jsonl`` (records with a ``text`` and a ``domain`` field, three domains).
:func:`make_user_folder` builds that folder from tiny local models (no hub); :func:`run_example`
runs a script or a command there as a user would, in a fresh process.

What a Markdown file offers for execution:

* :func:`code_blocks` — every fenced block with its language and, when the line just above the
  fence is ``<!-- not executed: <reason> -->`` (:data:`NOT_EXECUTED`), that reason;
* :func:`python_blocks` — the ``python`` blocks that are executed;
* :func:`distill_commands` — every line of a ``bash`` block that starts with
  ``ddk distill --teacher`` (a distillation of the user's own models), in executed blocks;
* :func:`page_steps` — everything of a page that runs, in page order: its ``python`` blocks and
  the command lines of its ``bash`` blocks that start with one of :data:`COMMAND_PREFIXES`.

:func:`run_page` runs a page's steps as one session in a fresh process (this file run as a
script): the ``python`` blocks share one namespace, as in a notebook, except the last block of
a guide (``fresh_last``), which must be a complete program and runs in a namespace of its own;
command lines run in between, in page order, as subprocesses (``ddk ...`` as
``python -m ddk.recipes.cli ...``, ``torchrun ...`` as ``python -m torch.distributed.run ...``).
A failure names the page and the line of the block.

This module is a helper, not a test module (no ``test_`` prefix): test files import it, never
each other.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from gloo_workers import gloo_aborted

ROOT = Path(__file__).resolve().parents[1]

#: The marker of a block that is shown but not run, with the reason: ``<!-- not executed: why -->``
#: on the line just above the opening fence.
NOT_EXECUTED = re.compile(r"^<!--\s*not executed:\s*(?P<reason>\S.*?)\s*-->\s*$")

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*$")
DISTILL_PREFIX = "ddk distill --teacher"
#: Command lines of ``bash`` blocks that the tests run; other lines (``make demo``, ``pip install``)
#: are shown only.
COMMAND_PREFIXES = (
    DISTILL_PREFIX,
    "ddk distill --student",
    "ddk teacher-cache",
    "ddk backends",
    "ddk compare",
    "torchrun ",
)


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block of a Markdown file: ``lang`` (``""`` if none), its text, the line of its
    opening fence (1-based) and the reason it is not executed (``None``: it is)."""

    lang: str
    text: str
    line: int
    not_executed: str | None = None


def code_blocks(markdown: str) -> list[CodeBlock]:
    """Every fenced block of ``markdown`` in order (fences may be indented, e.g. in admonitions)."""
    lines = markdown.splitlines()
    blocks: list[CodeBlock] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m["indent"]), i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        above = lines[start - 1].strip() if start > 0 else ""
        marker = NOT_EXECUTED.match(above)
        blocks.append(CodeBlock(m["lang"], "\n".join(body) + "\n", start + 1, marker["reason"] if marker else None))
        i += 1
    return blocks


def python_blocks(markdown: str) -> list[CodeBlock]:
    """The executed ``python`` blocks of ``markdown``."""
    return [b for b in code_blocks(markdown) if b.lang == "python" and b.not_executed is None]


def command_lines(block: CodeBlock) -> list[str]:
    """The lines of a ``bash`` block, with ``\\``-continued lines joined."""
    lines, current = [], ""
    for line in block.text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1]
            continue
        lines.append(current + line)
        current = ""
    return lines + ([current] if current else [])


def distill_commands(markdown: str) -> list[str]:
    """Lines of executed ``bash`` blocks that start with ``ddk distill --teacher``."""
    return [
        line
        for b in code_blocks(markdown)
        if b.lang == "bash" and b.not_executed is None
        for line in command_lines(b)
        if line.startswith(DISTILL_PREFIX)
    ]


def page_steps(markdown: str, origin: str, fresh_last: bool = False) -> list[dict[str, object]]:
    """What runs of a page, in order: ``{"kind": "python", "code", "origin", "fresh"}`` and
    ``{"kind": "command", "argv", "origin"}`` (``origin``: ``"<page>:<line>"``)."""
    steps: list[dict[str, object]] = []
    for b in code_blocks(markdown):
        if b.not_executed is not None:
            continue
        where = f"{origin}:{b.line}"
        if b.lang == "python":
            steps.append(
                {"kind": "python", "code": b.text, "origin": where, "page": origin, "line": b.line, "fresh": False}
            )
        elif b.lang == "bash":
            steps += [
                {"kind": "command", "argv": shlex.split(line), "origin": where}
                for line in command_lines(b)
                if line.startswith(COMMAND_PREFIXES)
            ]
    python = [s for s in steps if s["kind"] == "python"]
    if fresh_last and python:
        python[-1]["fresh"] = True
    return steps


def _argv(argv: list[str]) -> list[str]:
    """A printed command as this interpreter runs it (no installed entry points needed)."""
    if argv[0] == "ddk":
        return [sys.executable, "-m", "ddk.recipes.cli", *argv[1:]]
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    raise ValueError(f"no way to run {argv[0]!r}")


def run_page(
    markdown_path: Path, cwd: Path, *, fresh_last: bool = False, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the steps of ``markdown_path`` as one session in ``cwd``; fail the test if one fails."""
    origin = str(markdown_path.relative_to(ROOT)) if markdown_path.is_relative_to(ROOT) else markdown_path.name
    steps = page_steps(markdown_path.read_text(), origin, fresh_last)
    assert steps, f"{origin}: nothing to run"
    plan = cwd / f".steps-{markdown_path.stem}.json"
    plan.write_text(json.dumps(steps))
    return run_example([sys.executable, str(Path(__file__).resolve()), str(plan)], cwd, timeout=timeout)


def _session(plan: Path) -> int:
    """Run the steps written by :func:`run_page` (in this process: the python blocks; as
    subprocesses: the commands). Returns the exit status."""
    sys.path[0] = os.getcwd()  # as for a script the user keeps in this folder
    shared: dict[str, object] = {"__name__": "__main__"}
    for step in json.loads(plan.read_text()):
        print(f"--- {step['origin']}", flush=True)
        if step["kind"] == "command":
            res = _run_command(_argv(step["argv"]))  # type: ignore[arg-type]
            if res != 0:
                print(f"{step['origin']}: {' '.join(step['argv'])} exited with {res}", file=sys.stderr)  # type: ignore[arg-type]
                return 1
            continue
        ns = {"__name__": "__main__"} if step["fresh"] else shared
        code = "\n" * int(step["line"]) + str(step["code"])  # tracebacks give the page's own line numbers
        try:
            exec(compile(code, str(step["page"]), "exec"), ns)
        except BaseException:
            traceback.print_exc()
            print(f"{step['origin']}: the block above failed", file=sys.stderr)
            return 1
    return 0


def _run_command(argv: list[str]) -> int:
    """Run one command; a gloo group that fails only by torch's spurious abort runs once more."""
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for attempt in (1, 2):
        res = subprocess.run(argv, env=env, capture_output=True, text=True)
        sys.stdout.write(res.stdout[-4000:])
        sys.stderr.write(res.stderr[-8000:])
        if not (
            attempt == 1
            and argv[1:3] == ["-m", "torch.distributed.run"]
            and gloo_aborted(res.returncode, res.stdout + res.stderr)
        ):
            return res.returncode
    return res.returncode


def make_user_folder(root: Path, docs_per_domain: int = 60) -> Path:
    """``root`` holding ``my-teacher``, ``my-student`` (with its tokenizer) and ``my_corpus.jsonl``."""
    from hf_models import make_pair, write_jsonl

    root.mkdir(parents=True, exist_ok=True)
    teacher, student = make_pair(root / "models", "qwen2")
    shutil.move(str(teacher), str(root / "my-teacher"))
    shutil.move(str(student), str(root / "my-student"))
    write_jsonl(root / "my_corpus.jsonl", docs_per_domain=docs_per_domain)
    return root


def example_env() -> dict[str, str]:
    """The environment examples run in: this checkout importable, CPU only, one thread, no hub,
    Triton not interpreted."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for the kernel tests, not by users
    return env


def run_example(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``cwd`` with :func:`example_env`; fail the test with its stderr if it fails."""
    res = subprocess.run(cmd, cwd=cwd, env=example_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def run_python(script: str, cwd: Path, name: str) -> subprocess.CompletedProcess[str]:
    """Write ``script`` to ``cwd/name`` and run it with this interpreter, as a user runs a file."""
    path = cwd / name
    path.write_text(script)
    return run_example([sys.executable, str(path)], cwd)


def run_command(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one printed command line (``ddk ...`` or ``torchrun ...``) in ``cwd``."""
    return run_example(_argv(shlex.split(command)), cwd)


if __name__ == "__main__":
    sys.exit(_session(Path(sys.argv[1])))
