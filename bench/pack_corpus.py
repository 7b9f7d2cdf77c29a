"""A synthetic domain-labelled JSONL corpus of a given size, and a BPE tokenizer trained on a sample of
it, for the packing benchmark (``bench/pack_bench.py``) and the memory tests.

Four domains (``code``, ``prose``, ``math``, ``web``; the names are labels), each drawing its
words from a different quarter of Python's standard library at their frequencies there; documents of
30 to 3,000 words (log-uniform), one JSON line each; deterministic from the seed (and the Python
version, whose standard library supplies the words). A 2,048-token BPE tokenizer trained on 4,000
of its documents gives about 4 bytes of JSONL per token.

    .venv/bin/python bench/pack_corpus.py --out /tmp/ddk-pack/c200m.jsonl --mb 200
    .venv/bin/python bench/pack_corpus.py --tokenizer /tmp/ddk-pack/tok --vocab-size 2048
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DOMAINS = ("code", "prose", "math", "web")


def _vocabularies() -> dict[str, tuple[list[str], list[float]]]:
    """Per domain, the words of a quarter of Python's standard library (its ``.py`` files, sorted,
    dealt out in turn) with their counts there: real words and identifiers at their natural,
    Zipf-like frequencies, a different mix per domain."""
    import collections
    import re
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    word = re.compile(r"[A-Za-z][a-z]+|[a-z_]{2,}")
    out = {}
    for k, d in enumerate(DOMAINS):
        counts: collections.Counter[str] = collections.Counter()
        for f in files[k :: len(DOMAINS)]:
            counts.update(word.findall(f.read_text(encoding="utf-8", errors="replace")))
        common = counts.most_common(20000)
        out[d] = ([w for w, _ in common], [float(c) for _, c in common])
    return out


def documents(seed: int = 0) -> Any:
    """An endless deterministic stream of ``(domain, text)`` documents: 30 to 3,000 words
    (log-uniform) drawn from the domain's vocabulary, with a full stop every 13 words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = {d: (np.array(w, dtype=object), np.cumsum(c) / sum(c)) for d, (w, c) in _vocabularies().items()}
    while True:
        d = DOMAINS[int(rng.integers(len(DOMAINS)))]
        words, cdf = vocab[d]
        n = int(30 * 100 ** rng.random())
        picked = words[np.minimum(np.searchsorted(cdf, rng.random(n)), len(words) - 1)]
        picked[12::13] = [w + "." for w in picked[12::13]]
        yield d, " ".join(picked)


def write_corpus(path: str | Path, megabytes: float, seed: int = 0) -> Path:
    """Write about ``megabytes`` MB (10^6 bytes) of JSON lines ``{"domain": ..., "text": ...}`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = int(megabytes * 1e6)
    written = 0
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        buf: list[str] = []
        for d, text in documents(seed):
            line = json.dumps({"domain": d, "text": text}) + "\n"
            buf.append(line)
            written += len(line)
            if len(buf) >= 1000:
                f.write("".join(buf))
                buf = []
            if written >= target:
                break
        f.write("".join(buf))
    tmp.replace(path)
    return path


def train(out: str | Path, vocab_size: int = 2048, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer (``ddk.recipes.tokenizer.train_tokenizer``, as the tests train theirs)
    trained on 4,000 documents of the corpus' stream."""
    from ddk.recipes.tokenizer import train_tokenizer

    stream = documents(seed)
    texts = [next(stream)[1] for _ in range(4000)]
    return train_tokenizer(texts, out, vocab_size=vocab_size, min_frequency=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the JSONL file to write")
    p.add_argument("--mb", type=float, default=200.0, help="its size in MB (10^6 bytes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="also train a tokenizer into this folder")
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args()
    if args.out:
        write_corpus(args.out, args.mb, args.seed)
    if args.tokenizer:
        train(args.tokenizer, args.vocab_size, args.seed)


if __name__ == "__main__":
    main()
