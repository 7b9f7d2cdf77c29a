"""The documentation: its strict build, its API reference and its examples.

* ``mkdocs build --strict`` succeeds (a broken link or cross-reference, a page missing from the
  nav, a docstring Griffe cannot read fails it), into a temporary folder.
* Every public name of ``ddk``, ``ddk.data``, ``ddk.integrations.transformers``, ``ddk_kernels``
  (and of the public subpackages and modules with an ``__all__``) is an entry of a reference page: an anchor
  of the built site that resolves to the very object.
* Every page's examples run as printed (``doc_examples.run_page``): its ``python`` blocks in one
  session, its ``ddk distill --teacher`` / ``ddk backends`` / ``torchrun`` lines as commands, in
  a folder with the user's models and corpus the examples name. Each guide ends with a block
  that runs, and its last ``python`` block runs in a namespace of its own. The only blocks not
  run are ``torchrun`` commands marked ``<!-- not executed: <reason> -->`` (GPUs, or a run the
  distributed tests already make).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mkdocs", reason="the documentation build needs requirements-dev.txt")
pytest.importorskip("mkdocstrings_handlers.python", reason="the documentation build needs requirements-dev.txt")

from doc_examples import COMMAND_PREFIXES, ROOT, code_blocks, command_lines, make_user_folder, run_page

DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))
PAGES = sorted(DOCS.rglob("*.md"))


def _rel_docs(p: Path) -> str:
    return str(p.relative_to(DOCS))


RUNNABLE = [
    p
    for p in PAGES
    if any(
        b.not_executed is None
        and (
            b.lang == "python"
            or (b.lang == "bash" and any(line.startswith(COMMAND_PREFIXES) for line in command_lines(b)))
        )
        for b in code_blocks(p.read_text())
    )
]
PUBLIC_MODULES = (
    "ddk",
    "ddk.data",
    "ddk.integrations.transformers",
    "ddk_kernels",
    "ddk.partition",
    "ddk.discrepancy",
    "ddk.schedule",
    "ddk.sampling",
    "ddk.losses",
    "ddk.distributed",
    "ddk.engine",
)
ANCHOR = re.compile(r'id="((?:ddk|ddk_kernels)(?:\.\w+)*)"')


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return out


@pytest.mark.e2e
def test_docs_build_strict_without_warnings(site: Path) -> None:
    assert (site / "index.html").is_file() and (site / "reference" / "kernels" / "index.html").is_file()
    assert (site / "results" / "index.html").is_file() and (site / "figures" / "e2e_uniform_weights.png").is_file()


def _resolve(path: str) -> Any:
    """The object an anchor like ``ddk.sampling.MixtureSampler`` names, or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None


@pytest.mark.e2e
def test_reference_documents_every_public_name(site: Path) -> None:
    anchors = {a for page in (site / "reference").rglob("index.html") for a in ANCHOR.findall(page.read_text())}
    documented = [_resolve(a) for a in anchors]
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not any(d is obj for d in documented):
                missing.append(f"{module_name}.{name}")
    assert missing == [], f"public names without an entry in docs/reference/: {missing}"


def test_every_page_is_in_the_nav_and_every_guide_ends_with_a_block_that_runs() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [p for p in PAGES if str(p.relative_to(DOCS)) not in nav] == []
    assert len(GUIDES) >= 6
    for guide in GUIDES:
        last = code_blocks(guide.read_text())[-1]
        runs = last.lang == "python" or (
            last.lang == "bash" and any(line.startswith(COMMAND_PREFIXES) for line in command_lines(last))
        )
        assert runs and last.not_executed is None, f"{_rel(guide)}: the last block (line {last.line}) must run"


def test_only_marked_torchrun_blocks_are_not_run_and_every_command_is_one_that_runs() -> None:
    marked = []
    for page in PAGES:
        for b in code_blocks(page.read_text()):
            where = f"{_rel(page)}:{b.line}"
            commands = [
                line for line in command_lines(b) if b.lang == "bash" and line.startswith(("ddk ", "torchrun "))
            ]
            if b.not_executed is not None:
                assert b.lang == "bash" and commands and all(c.startswith("torchrun ") for c in commands), (
                    f"{where}: only torchrun commands may be marked not executed"
                )
                marked.append((where, b.not_executed))
                continue
            assert b.lang in ("python", "bash", "json", ""), f"{where}: a {b.lang!r} block is neither run nor marked"
            assert all(c.startswith(COMMAND_PREFIXES) for c in commands), (
                f"{where}: {commands} would be shown but not run; use a command the tests run or mark the block"
            )
    assert [w.split(":")[0] for w, _ in marked] == ["docs/guides/distributed.md"] * 2 + ["docs/guides/scale.md"], marked
    assert all(len(reason) > 20 for _, reason in marked)


def test_readme_links_every_guide() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Documentation") :].split("\n## ", 1)[0]
    links = re.findall(r"\]\((docs/[^)#]+\.md)\)", section)
    assert all((ROOT / link).is_file() for link in links), links
    assert {_rel(g) for g in GUIDES} <= set(links)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_user_folder(tmp_path_factory.mktemp("docs-user"))


# The pages whose examples are whole multi-process or multi-run sessions (20-45 s each on 2 cores)
# run in `make test-all`; every other page's examples run in `make test`.
SLOW_PAGES = {"guides/cli.md", "guides/distributed.md", "guides/reliability.md", "guides/teacher-cache.md"}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, id=str(p.relative_to(DOCS)), marks=[pytest.mark.slow] if _rel_docs(p) in SLOW_PAGES else [])
        for p in RUNNABLE
    ],
)
def test_docs_examples_run_as_printed(user_folder: Path, tmp_path: Path, page: Path) -> None:
    cwd = tmp_path / "work"
    shutil.copytree(user_folder, cwd)
    run_page(page, cwd, fresh_last=page in GUIDES)


def test_cli_guide_sample_lines_show_the_learning_rate_its_command_schedules() -> None:
    """The lines 'What a run prints' shows come from the guide's command: their ``lr`` is the one
    its --steps and --warmup-steps give (AdamW's warm-up + cosine, --lr and --min-lr-ratio defaults)."""
    import torch

    from ddk.engine.config import RunConfig
    from ddk.engine.step import make_optimizer

    text = (DOCS / "guides" / "cli.md").read_text()
    command = next(line for b in code_blocks(text) for line in command_lines(b) if line.startswith("ddk distill"))
    argv = command.split()
    steps, warmup = (int(argv[argv.index(flag) + 1]) for flag in ("--steps", "--warmup-steps"))
    d = RunConfig()
    opt, sched = make_optimizer(torch.nn.Linear(2, 2), d.lr, 0.0, warmup, steps, d.min_lr_ratio)
    want = {}
    for step in range(1, steps + 1):
        opt.step()
        sched.step()
        want[step] = f"lr {sched.get_last_lr()[0]:.2e}"
    shown = re.findall(rf"^distill \w+: step (\d+)/{steps} .*?(lr \S+)", text, flags=re.M)
    assert shown and all(lr == want[int(step)] for step, lr in shown), (shown, want)
