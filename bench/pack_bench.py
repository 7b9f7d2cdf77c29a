"""Packing a corpus larger than memory: peak RSS and tokens/s of ``ddk.data.pack_files`` at several
corpus sizes and numbers of tokenizing processes, against the former path (``load_records`` into a
``datasets.Dataset``, then the single-process ``pack_domains`` of commit 3d08808) where it fits.

Each measurement runs in a fresh child process: it imports what a run imports, loads the tokenizer,
notes its RSS, packs the corpus into an empty cache folder (``--seq-len`` 2048, ``--val-samples``
500, the hash split), and reports the wall time, the tokens packed (the windows' tokens), the
peak RSS of the packing process (``VmHWM``, reset to the RSS before packing) and the largest peak
RSS of its tokenizing workers (``ru_maxrss`` of its children: it counts the pages a forked worker
shares with its parent). The corpora (``bench/pack_corpus.py``) and the tokenizer are made under
``--dir`` when missing; each cache is deleted after its measurement. ``TOKENIZERS_PARALLELISM=false``
throughout, so that one process is one core.

    .venv/bin/python bench/pack_bench.py --sizes 0.2 1 4 --procs 1 2 --former 0.2 --json bench/results/pack.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FORMER_COMMIT = "3d08808"  # the last commit that packed from a Dataset in memory, in one process
SEQ_LEN, VAL_SAMPLES = 2048, 500


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))


def _cpu(who: int) -> float:
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


def _files_digest(root: Path) -> str:
    """A digest of the cache's files (the SHA-256s and shapes its ``meta.json`` lists)."""
    import hashlib

    meta = json.loads((root / "meta.json").read_text())
    return hashlib.sha256(json.dumps([meta["train"], meta["validation"]]).encode()).hexdigest()[:16]


def child(corpus: str, tokenizer: str, cache: str, procs: int, former: bool) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import datasets  # noqa: F401  (imported before the baseline, as a run has them)
    import pyarrow  # noqa: F401
    from transformers import PreTrainedTokenizerFast

    import ddk.data.packed  # noqa: F401  (torch)

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer)
    tok("warm up", add_special_tokens=False)
    kw: dict[str, Any] = dict(seq_len=SEQ_LEN, val_samples=VAL_SAMPLES, cache_dir=cache, progress=False)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    load = os.getloadavg()[0]
    start = time.perf_counter()
    if former:
        from ddk.data import load_records, pack_domains

        packed = pack_domains(load_records(corpus, progress=False), tok, **kw)
    else:
        from ddk.data import pack_files

        packed = pack_files(corpus, tok, num_proc=procs, **kw)
    seconds = time.perf_counter() - start
    tokens = (sum(packed.sizes) + sum(int(a.shape[0]) for a in packed.validation)) * SEQ_LEN
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "rss_before": base,
        "peak_rss": _status("VmHWM"),
        "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10,
        "cpu_s": _cpu(resource.RUSAGE_SELF),
        "worker_cpu_s": _cpu(resource.RUSAGE_CHILDREN),
        "key": packed.key,
        "files": _files_digest(Path(cache) / packed.key),
        "load_start": load,
        "load_end": os.getloadavg()[0],
    }


def _former_tree(work: Path) -> Path:
    """The package as of ``FORMER_COMMIT``, extracted once under ``work``."""
    tree = work / f"ddk-{FORMER_COMMIT}"
    if not (tree / "ddk").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", FORMER_COMMIT, "ddk", "ddk_kernels"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def measure(corpus: Path, tokenizer: Path, work: Path, procs: int, former: bool) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(prefix="pack-cache-", dir=work))
    root = _former_tree(work) if former else REPO
    env = dict(os.environ, PYTHONPATH=str(root), TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, __file__, "--child", str(corpus), str(tokenizer), str(cache), str(procs)]
    try:
        res = subprocess.run(cmd + (["--former-child"] if former else []), env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError(f"the measurement failed:\n{res.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(res.stdout.splitlines()[-1])
    out.update(corpus_bytes=corpus.stat().st_size, procs=procs, path="former" if former else "pack_files")
    return out


def table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table; tokens/s also as a ratio to one process at the same size."""
    one = {r["gb"]: r["tokens_per_s"] for r in results if r["path"] == "pack_files" and r["procs"] == 1}
    rows = [
        "| corpus | path | processes | tokens | seconds | M tokens/s | vs 1 process | CPU s (main + workers) "
        "| RSS before | peak RSS | peak - before | worker peak RSS | load avg start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['tokens_per_s'] / one[r['gb']]:.2f}x" if r["gb"] in one else "-"
        mib = 1 << 20
        rows.append(
            f"| {r['gb']:g} GB | {r['path']} | {r['procs']} | {r['tokens'] / 1e6:.1f}M | {r['seconds']:.0f} | "
            f"{r['tokens_per_s'] / 1e6:.3f} | {ratio} | {r['cpu_s']:.0f} + {r['worker_cpu_s']:.0f} | "
            f"{r['rss_before'] // mib} MiB | {r['peak_rss'] // mib} MiB | {(r['peak_rss'] - r['rss_before']) // mib} MiB | "
            f"{r['worker_peak_rss'] // mib if r['worker_peak_rss'] else '-'}{' MiB' if r['worker_peak_rss'] else ''} | "
            f"{r['load_start']:.1f} -> {r['load_end']:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[0.2, 1.0, 4.0], help="corpus sizes in GB (10^9 bytes)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="numbers of tokenizing processes")
    p.add_argument("--former", type=float, nargs="*", default=[0.2], help="sizes also packed the former way")
    p.add_argument("--dir", default="/tmp/ddk-pack", help="folder of the corpora, the tokenizer and the caches")
    p.add_argument("--json", help="append the results to this JSON file")
    p.add_argument("--table", help="print the Markdown table of this JSON file of results, and exit")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--former-child", dest="former_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        corpus, tokenizer, cache, procs = args.child
        print(json.dumps(child(corpus, tokenizer, cache, int(procs), args.former_child)))
        return
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    sys.path.insert(0, str(REPO / "bench"))
    from pack_corpus import train, write_corpus

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = work / "tok"
    if not (tokenizer / "tokenizer.json").is_file():
        train(tokenizer, vocab_size=2048)
    results = []
    for gb in args.sizes:
        corpus = work / f"corpus-{gb:g}gb.jsonl"
        if not corpus.is_file():
            write_corpus(corpus, gb * 1000)
        runs = [(n, False) for n in args.procs] + ([(1, True)] if gb in args.former else [])
        for procs, former in runs:
            r = measure(corpus, tokenizer, work, procs, former)
            r["gb"] = gb
            results.append(r)
            print(
                f"{gb:g} GB {r['path']:>10} procs={procs}: {r['seconds']:.0f} s, {r['tokens'] / 1e6:.1f}M tokens, "
                f"{r['tokens_per_s'] / 1e6:.3f} M tokens/s, peak RSS {r['peak_rss'] >> 20} MiB "
                f"(before {r['rss_before'] >> 20} MiB), worker peak {r['worker_peak_rss'] >> 20} MiB, "
                f"CPU {r['cpu_s']:.0f} s + workers {r['worker_cpu_s']:.0f} s, load {r['load_start']:.1f} -> {r['load_end']:.1f}",
                flush=True,
            )
            if args.json:
                path = Path(args.json)
                old = json.loads(path.read_text()) if path.is_file() else []
                path.write_text(json.dumps(old + [r], indent=1) + "\n")


if __name__ == "__main__":
    main()
