"""The multi-node command of docs/guides/scale.md, run as two nodes on loopback, equals one process.

The page's ``torchrun --nnodes 2 ... -m ddk.recipes.cli distill ...`` line is read from the
Markdown; its paths and sizes are placeholders, replaced here by tiny local models
(``hf_models.make_pair``, ``write_jsonl``) and small sizes, and the rest of the argument list is
run as printed by two ``torchrun`` agents at once, each ``--nproc-per-node 1`` with a c10d
rendezvous on ``127.0.0.1``: two nodes of one rank each, gloo on the CPU. The reference is one
plain ``ddk distill`` process with the same arguments (no ``--fsdp``, which needs a process
group) and so the same global batch.

Tolerance, as in test_distributed_distill.py: two ranks compute the one-process gradient of each
global batch, summed in another order, so results differ by float32 rounding only (measured
8.6e-7 on the parameters, 1.8e-7 relative on the per-domain CE after 6 AdamW steps at lr 2e-3);
asserted 1e-5 and 1e-6.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from doc_examples import ROOT, code_blocks, command_lines
from gloo_workers import free_port, gloo_aborted

PAGE = ROOT / "docs" / "guides" / "scale.md"
LAUNCHER = {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"}
PLACEHOLDERS = {"--teacher", "--student", "--data", "--data-dir", "--out", "--batch-size", "--seq-len", "--tokens"}
# what the tiny run adds to the page's arguments: its validation size, interval, schedule, logging
TINY = (
    "--val-samples 4 --eval-batch-size 4 --interval 3 --warmup-steps 2 --lr 2e-3 --log-every 1 "
    "--checkpoint-every 3 --threads 1 --no-progress"
).split()
PARAM_ATOL, REL = 1e-5, 1e-6
# A sitecustomize for the two-node run: an audit hook in every process (agents and ranks) that logs
# each write under DDK_TEST_WRITES_UNDER (files opened for writing, mkdir, rename, remove, rmtree)
# with the process's RANK, so the test sees which rank wrote what.
AUDIT_HOOK = r"""
import os, sys
_LOG = os.environ.get("DDK_TEST_WRITES_LOG")
_UNDER = tuple(p for p in os.environ.get("DDK_TEST_WRITES_UNDER", "").split(os.pathsep) if p)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink")

def _hook(event, args):
    if event == "open":
        mode, flags = args[1], args[2]
        if not (isinstance(mode, str) and any(c in mode for c in "wax+")) and not (
            isinstance(flags, int) and flags & _WRITE
        ):
            return
    elif event not in _EVENTS:
        return
    if not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    if path.startswith(_UNDER):
        with open(_LOG, "a") as f:
            f.write(os.environ.get("RANK", "-") + "\t" + event + "\t" + path + "\n")

if _LOG and _UNDER:
    sys.addaudithook(_hook)
"""


def _page_commands() -> tuple[list[str], list[str]]:
    """``(argv of the torchrun line, argv of the SLURM script's torchrun)`` of the page."""
    lines = [line for b in code_blocks(PAGE.read_text()) if b.lang == "bash" for line in command_lines(b)]
    torchrun = [shlex.split(line) for line in lines if line.startswith("torchrun --nnodes")]
    srun = [shlex.split(line)[1:] for line in lines if line.startswith("srun torchrun ")]
    assert len(torchrun) == 1 and len(srun) == 1, (torchrun, srun)
    return torchrun[0], srun[0]


def _split(argv: list[str]) -> tuple[dict[str, str], dict[str, str | None]]:
    """``torchrun <launcher options> -m ddk.recipes.cli distill <options>`` -> the two option maps
    (a flag without a value maps to None)."""
    assert argv[0] == "torchrun", argv
    m = argv.index("-m")
    assert argv[m + 1 : m + 3] == ["ddk.recipes.cli", "distill"], argv

    def options(args: list[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        i = 0
        while i < len(args):
            assert args[i].startswith("--"), args[i]
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            out[args[i]] = args[i + 1] if has_value else None
            i += 2 if has_value else 1
        return out

    launcher = options(argv[1:m])
    return {k: str(v) for k, v in launcher.items()}, options(argv[m + 3 :])


def test_multinode_page_commands_are_one_argument_list() -> None:
    """The torchrun line and the SLURM script launch the same ``ddk distill`` arguments, and every
    option the two-node test replaces is a placeholder of the page (nothing else is)."""
    (launch, ddk_args), (slurm_launch, slurm_args) = map(_split, _page_commands())
    assert set(launch) == set(slurm_launch) == LAUNCHER
    assert launch["--nnodes"] == "2" and launch["--rdzv-backend"] == slurm_launch["--rdzv-backend"] == "c10d"
    assert slurm_launch["--nnodes"] == "$SLURM_NNODES" and slurm_launch["--rdzv-id"] == "$SLURM_JOB_ID"
    assert slurm_args == ddk_args
    assert set(ddk_args) == PLACEHOLDERS | {"--fsdp"} and ddk_args["--fsdp"] is None


def _tiny_argv(argv: list[str], values: dict[str, str]) -> list[str]:
    """The page's argument list with the option values of ``values`` replaced, then ``TINY``."""
    out = list(argv)
    for opt, value in values.items():
        out[out.index(opt) + 1] = value
    return out + TINY


def _env(*first: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([*map(str, first), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        GLOO_SOCKET_IFNAME="lo",
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DDK_DEBUG", "TRITON_INTERPRET"):
        env.pop(k, None)
    return env


def _two_nodes(argv: list[str], values: dict[str, str], audit: Path) -> tuple[list[str], Path, list[list[str]]]:
    """Start two torchrun agents with the page's arguments (``values`` replaced, a fresh loopback
    port), wait for both; return their logs, the run folder and the writes under the run folder
    and ``--data-dir`` as ``[rank, event, path]``. Once more (another folder) after gloo's
    spurious abort."""
    (audit / "hook").mkdir(parents=True, exist_ok=True)
    (audit / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK)
    for attempt in (1, 2):
        port, out = free_port(), f"{values['--out']}-{attempt}"
        cmd = _tiny_argv(argv, {**values, "--rdzv-endpoint": f"127.0.0.1:{port}", "--out": out})
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
        writes = audit / f"writes-{attempt}.tsv"
        env = _env(audit / "hook")
        env.update(DDK_TEST_WRITES_LOG=str(writes), DDK_TEST_WRITES_UNDER=os.pathsep.join([out, values["--data-dir"]]))
        agents = [
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)
        ]
        try:
            logs = [a.communicate(timeout=600)[0] for a in agents]
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            pytest.fail("the two torchrun agents did not finish in 600 s (a rendezvous or collective hang?)")
        codes = [a.returncode for a in agents]
        if codes == [0, 0]:
            return logs, Path(out), [line.split("\t") for line in writes.read_text().splitlines()]
        if attempt == 2 or not any(gloo_aborted(c, log) for c, log in zip(codes, logs)):
            pytest.fail(f"torchrun agents exited {codes}:\n" + "\n=====\n".join(log[-6000:] for log in logs))
    raise AssertionError("unreachable")


@pytest.mark.e2e
@pytest.mark.slow  # about a minute on two cores: four Python processes import torch and transformers
def test_two_nodes_on_loopback_equal_one_process(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from hf_models import make_pair, write_jsonl
    from safetensors.torch import load_file

    teacher, student = make_pair(tmp_path / "models", "llama")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs_per_domain=30)
    values = {
        "--nproc-per-node": "1",
        "--teacher": str(teacher),
        "--student": str(student),
        "--data": str(corpus),
        "--data-dir": str(tmp_path / "cache"),
        "--out": str(tmp_path / "two-nodes"),
        "--batch-size": "4",  # the global batch: 2 sequences per rank
        "--seq-len": "16",
        "--tokens": "384",  # 6 steps of 4 x 16 tokens
    }
    argv, _ = _page_commands()
    logs, two, writes = _two_nodes(argv, values, tmp_path / "audit")

    # one printer: the agent holding global rank 0 (not each node's local rank 0)
    printed = ["distill: done" in log for log in logs]
    assert sorted(printed) == [False, True], logs
    quiet = logs[printed.index(False)]
    assert "teacher CE" not in quiet and not any(line.startswith("distill") for line in quiet.splitlines()), quiet
    # what each rank wrote (docs/guides/scale.md's table): rank 0 packed the corpus (once: rank 1 made
    # no build folder) and wrote the run folder; rank 1 only created --out (exist_ok) and wrote its
    # own checkpoint shards into the hidden folders rank 0 made; the agents wrote nothing there
    assert {rank for rank, _, _ in writes} == {"0", "1"}, writes
    cache = values["--data-dir"]
    assert any(e == "os.mkdir" and p.startswith(f"{cache}/packed/.tmp-") for r, e, p in writes if r == "0")
    mine = re.compile(
        rf"{re.escape(str(two))}(/\.checkpoint-\d+\.tmp-\d+/shards(/shard-0*2-model-\d+-of-\d+\.safetensors)?)?"
    )
    rank1 = [(e, p) for r, e, p in writes if r == "1"]
    assert [p for _, p in rank1 if not mine.fullmatch(p)] == [], rank1
    assert sum(p.endswith(".safetensors") for _, p in rank1) == 2  # checkpoint-3 and checkpoint-6
    packed = list((tmp_path / "cache" / "packed").iterdir())
    assert len(packed) == 1 and not packed[0].name.startswith("."), packed  # no build left over
    steps = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))

    # one plain process, the same arguments without --fsdp (it needs a process group): the same global batch
    one = tmp_path / "one-process"
    ref = _tiny_argv(argv, {**values, "--out": str(one)})
    ref = ref[ref.index("distill") :]
    ref.remove("--fsdp")
    res = subprocess.run(
        [sys.executable, "-m", "ddk.recipes.cli", *ref], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-6000:]

    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    s1, s2 = (load_file(str(r / "student" / "model.safetensors")) for r in (one, two))
    assert s1.keys() == s2.keys()
    worst = max((s1[k] - s2[k]).abs().max().item() for k in s1)
    assert worst <= PARAM_ATOL, f"student parameters differ by {worst:.3g} > {PARAM_ATOL}"
    start = load_file(str(student / "model.safetensors"))
    assert max((s1[k] - start[k]).abs().max().item() for k in s1) > 100 * PARAM_ATOL  # the runs did train
    sum1, sum2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert sum2["domains"] == sum1["domains"] and sum2["samples_per_domain"] == sum1["samples_per_domain"]
    for key in ("student_ce", "teacher_ce", "final_weights"):
        assert sum2[key] == pytest.approx(sum1[key], rel=REL), key
