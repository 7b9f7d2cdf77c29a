"""The one tokenizer rule: teacher and student must tokenize identically; only padding rows of
their output embeddings may differ.

``check_tokenizers`` is the check that ``ddk distill``, ``ddk teacher-cache``, ``DDKTrainer`` and
an own loop run. It compares what decides the ids a distillation sees: the ids of a fixed probe
text (:data:`PROBE_TEXT`: ASCII, digits, runs of whitespace, accented and Greek/Cyrillic
letters, CJK, emoji, code) tokenized as ``pack_domains`` tokenizes (no added special tokens),
the vocabulary size ``len(tokenizer)`` and the special tokens with their ids (the pad token
aside: padded positions are masked). Two tokenizers of different classes pass when they agree on
all of that; a same ``tokenizer.json`` that two classes turn into different ids does not. The
models' output embeddings must have at least the tokenizer's rows, the teacher's at least the
student's (the rows past them are padding, sliced off).

``tokenizer_signature`` is that comparison's input as JSON (a teacher cache stores it in its
manifest, so that a run is checked against the cache's tokenizer with the same words).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PROBE_TEXT", "check_tokenizers", "output_rows", "tokenizer_signature"]

#: The text whose ids two tokenizers must agree on. It starts with a lowercase word (a tokenizer
#: that adds a prefix space differs at token 0) and covers the common ways tokenizers diverge.
PROBE_TEXT = (
    "the quick brown fox jumps over 13 lazy dogs; The QUICK Brown Fox, 2024-06-30 at 09:45.\n"
    "Numbers 0 7 42 365 1000000 3.14159 -2.5e-3 0x1F 1,234,567 and 12345678901234567890.\n"
    "  two spaces,\tone tab,\t\ttwo tabs,    four spaces.\n\n\nthree newlines\r\n"
    "naïve café résumé Straße Ærøskøbing Ελληνικά ελληνικά русский текст Ünïcödé\n"
    "日本語の文章です。中文字符和标点符号。한국어 문장입니다.\n"
    "emoji 😀 👍🏽 🇩🇪 👨‍👩‍👧 ✓ → ∑ ∞ ≠ €\n"
    "def square(x: int) -> int:\n    return x ** 2  # comment\n"
    'if (a != b && c[i] >= 0) { printf("%d\\n", a); }  // C\n'
    '{"key": [1, 2.5, null, true], "url": "https://example.org/a?b=c&d=e"}\n'
)

_SHOWN = 4  # tokens shown on each side of the first difference


def output_rows(model: Any) -> int:
    """Rows of the model's output embedding (its logits' width)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    # a ZeRO-3 parameter (loaded under deepspeed.zero.Init) is empty while partitioned: its ds_shape is the whole one
    shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", None)
    if shape is not None and len(shape) == 2:
        return int(shape[0])
    return int(model.config.vocab_size)


def _specials(tokenizer: Any) -> dict[str, list[Any]]:
    """``{role: [token, id]}`` of the special tokens (``additional_special_tokens`` joined)."""
    out: dict[str, list[Any]] = {}
    smap = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    for role, value in sorted(smap.items()):
        if value is None or value == []:
            continue
        tokens = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        ids = tokenizer.convert_tokens_to_ids(tokens)
        out[role] = [" ".join(tokens), " ".join(str(i) for i in ids)]
    return out


def tokenizer_signature(tokenizer: Any) -> dict[str, Any]:
    """What ``check_tokenizers`` compares of ``tokenizer``, as JSON.

    Args:
        tokenizer: a ``transformers`` tokenizer (callable, with ``convert_ids_to_tokens``).

    Returns:
        ``{"class", "name", "size", "probe_ids", "probe_tokens", "special"}``: the class name and
        ``name_or_path`` (shown, never compared), ``len(tokenizer)``, the ids and token strings of
        :data:`PROBE_TEXT` and ``{role: [token, id]}`` of the special tokens.
    """
    if not callable(tokenizer) or not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
        raise TypeError(
            f"tokenizer_signature: tokenizer must be a transformers tokenizer; got {type(tokenizer).__name__}."
        )
    ids = [int(i) for i in tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]]
    return {
        "class": type(tokenizer).__name__,
        "name": str(getattr(tokenizer, "name_or_path", "") or ""),
        "size": int(len(tokenizer)),
        "probe_ids": ids,
        "probe_tokens": [str(t) for t in tokenizer.convert_ids_to_tokens(ids)],
        "special": _specials(tokenizer),
    }


def _signature(obj: Any, fn: str, arg: str) -> dict[str, Any]:
    """``obj``'s signature: computed for a tokenizer, checked for a stored one (a manifest's)."""
    if not isinstance(obj, Mapping):
        return tokenizer_signature(obj)
    sig = dict(obj)
    ok = (
        isinstance(sig.get("size"), int)
        and isinstance(sig.get("probe_ids"), list)
        and all(isinstance(i, int) for i in sig["probe_ids"])
        and isinstance(sig.get("probe_tokens"), list)
        and len(sig["probe_tokens"]) == len(sig["probe_ids"])
        and isinstance(sig.get("special"), Mapping)
    )
    if not ok:
        raise ValueError(
            f"{fn}: {arg} must be a tokenizer or a tokenizer_signature; got a mapping with keys {sorted(sig)}."
        )
    return sig


def _describe(sig: Mapping[str, Any]) -> str:
    name = f" from {sig['name']!r}" if sig.get("name") else ""
    return f"{sig.get('class', '?')}{name}"


def _tokens(sig: Mapping[str, Any], start: int) -> str:
    ids, toks = sig["probe_ids"][start : start + _SHOWN], sig["probe_tokens"][start : start + _SHOWN]
    shown = ", ".join(f"{i} {t!r}" for i, t in zip(ids, toks))
    return f"[{shown}{', ...' if start + _SHOWN < len(sig['probe_ids']) else ''}]"


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], names: tuple[str, str]) -> list[str]:
    """What differs between two signatures, in words (empty: they tokenize identically)."""
    na, nb = names
    out = []
    if a["size"] != b["size"]:
        out.append(f"different vocabulary sizes ({na} {a['size']}, {nb} {b['size']})")
    ia, ib = a["probe_ids"], b["probe_ids"]
    if ia != ib:
        first = next((k for k, (x, y) in zip(range(len(ia)), zip(ia, ib)) if x != y), min(len(ia), len(ib)))
        out.append(
            f"different ids of the probe text from token {first} on ({len(ia)} and {len(ib)} tokens in all): "
            f"{na} {_tokens(a, first)}, {nb} {_tokens(b, first)}"
        )
    sa, sb = dict(a["special"]), dict(b["special"])
    for role in sorted((set(sa) | set(sb)) - {"pad_token"}):
        if sa.get(role) != sb.get(role):
            show = {n: (f"{s[role][0]!r} (id {s[role][1]})" if role in s else "none") for n, s in ((na, sa), (nb, sb))}
            out.append(f"a different {role} ({na} {show[na]}, {nb} {show[nb]})")
    return out


def check_tokenizers(
    student_tokenizer: Any,
    teacher_tokenizer: Any = None,
    *,
    student: Any = None,
    teacher: Any = None,
    fn: str = "check_tokenizers",
    names: tuple[str, str] = ("teacher", "student"),
) -> None:
    """Raise ``ValueError`` unless the models may be distilled into each other with these tokenizers.

    The rule: ``teacher_tokenizer`` and ``student_tokenizer`` tokenize identically (the same ids
    of :data:`PROBE_TEXT`, the same ``len``, the same special tokens and ids, the pad token
    aside); the student's output embedding has at least ``len(student_tokenizer)`` rows and the
    teacher's at least the student's (rows past them, such as Qwen's padding from 151936 to
    152064, are sliced off). The error names every difference: the sizes, the first differing
    probe tokens with their ids, the special tokens, and both tokenizers' classes.

    Args:
        student_tokenizer: the run's tokenizer (it tokenizes the data), or a stored
            ``tokenizer_signature``.
        teacher_tokenizer: the teacher's own tokenizer (or its signature), or None when the
            teacher ships none (then only the rows are checked).
        student: the student causal LM, or None (no row check).
        teacher: the teacher causal LM, or None.
        fn: the name errors start with.
        names: how the messages call the teacher's and the student's side (a teacher cache says
            ``("cache", "run")``).

    Examples:
        >>> class Toy:  # a two-token tokenizer
        ...     name_or_path, special_tokens_map = "toy", {"eos_token": "b"}
        ...     def __call__(self, text, add_special_tokens=False):
        ...         return {"input_ids": [0 if c < "m" else 1 for c in text[:5]]}
        ...     def __len__(self): return 2
        ...     def convert_ids_to_tokens(self, ids): return ["a", "b"][ids] if isinstance(ids, int) else [["a", "b"][i] for i in ids]
        ...     def convert_tokens_to_ids(self, toks): return [{"a": 0, "b": 1}[t] for t in toks]
        >>> check_tokenizers(Toy(), Toy())  # identical: no error
    """
    sig_s = _signature(student_tokenizer, fn, "student_tokenizer")
    na, nb = names
    if teacher_tokenizer is not None:
        sig_t = _signature(teacher_tokenizer, fn, "teacher_tokenizer")
        diffs = _differences(sig_t, sig_s, names)
        if diffs:
            raise ValueError(
                f"{fn}: {na} and {nb} must tokenize identically (only padding rows of the output embeddings may "
                f"differ); got " + "; ".join(diffs) + f". Tokenizers: {na} {_describe(sig_t)}, {nb} "
                f"{_describe(sig_s)}. Distil between models that share one tokenizer (the same tokenizer files "
                "and class); a teacher padded to more output rows needs no other tokenizer."
            )
    size = int(sig_s["size"])
    vs = output_rows(student) if student is not None else None
    s_name = getattr(student, "name_or_path", "") or f"the {nb}"
    if vs is not None and vs < size:
        raise ValueError(
            f"{fn}: the {nb}'s vocabulary must cover the tokenizer's {size} tokens; got an lm_head of "
            f"{vs} rows in {s_name}. Pass the tokenizer the {nb} was trained with (--tokenizer, processing_class)."
        )
    if teacher is None:
        return
    vt = output_rows(teacher)
    t_name = getattr(teacher, "name_or_path", "") or f"the {na}"
    need, of = (vs, f"the {nb}'s {vs} rows ({s_name})") if vs is not None else (size, f"the tokenizer's {size} tokens")
    if vt < need:
        raise ValueError(
            f"{fn}: the {na}'s vocabulary must cover {of} (a {na} wider by padding rows is sliced); got "
            f"{vt} rows in {t_name}. Teacher and student must share a tokenizer."
        )
