"""``DomainPartitioner``: assigns a domain name to every example and splits each domain into
train and validation sets with a stable, hash-based rule.

The split of an example depends only on ``(seed, key)`` hashed with BLAKE2b (never Python's
salted ``hash()``), so it is identical across processes, machines and runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KeyFn = Callable[[Mapping[str, Any]], Any]


def stable_unit_hash(key: str, seed: int = 0) -> float:
    """Deterministic hash of ``(seed, key)`` mapped to ``[0, 1)`` (BLAKE2b, 64 bits).

    Examples:
        >>> stable_unit_hash("abc", seed=0) == stable_unit_hash("abc", seed=0)
        True
    """
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _datasets_classes() -> tuple[type | None, type | None]:
    """``(Dataset, IterableDataset)`` if the ``datasets`` package is already imported.

    An object can only be a ``datasets`` dataset if the package was imported, so this never
    imports it.
    """
    mod = sys.modules.get("datasets")
    if mod is None:
        return None, None
    return getattr(mod, "Dataset", None), getattr(mod, "IterableDataset", None)


def _is_instance(obj: Any, cls: type | None) -> bool:
    return cls is not None and isinstance(obj, cls)


def _example_key(example: Mapping[str, Any], key: str | KeyFn | None) -> str:
    if callable(key):
        return str(key(example))
    if isinstance(key, str):
        return str(example[key])
    if "id" in example and example["id"] is not None:
        return str(example["id"])
    return json.dumps(dict(example), sort_keys=True, default=str, ensure_ascii=False)


def _field_value(example: Mapping[str, Any], field: str) -> Any:
    """``example[field]``, or the error naming the field and the keys the example has."""
    try:
        return example[field]
    except (KeyError, TypeError):
        raise ValueError(
            f"DomainPartitioner.assign: example must have the field {field!r}; got keys "
            f"{sorted(example) if isinstance(example, Mapping) else type(example).__name__}."
        ) from None


@dataclass(frozen=True)
class DomainSplits:
    """Per-domain train and validation data returned by ``DomainPartitioner.split``.

    Attributes:
        train: domain name -> train examples (a ``datasets.Dataset``/``IterableDataset`` of the
            input's type, or a list of dicts for plain sequences).
        validation: domain name -> validation examples, same types.
        domains: the domain names in order (the order of weights and sampler domains).
    """

    train: dict[str, Any]
    validation: dict[str, Any]
    domains: tuple[str, ...]

    def sizes(self) -> dict[str, tuple[int, int]]:
        """``name -> (len(train), len(validation))`` (map-style data only)."""
        return {d: (len(self.train[d]), len(self.validation[d])) for d in self.domains}


class DomainPartitioner:
    """Assigns a domain name to each example (a dict) and splits data per domain.

    Build one with ``by_field``, ``by_rules`` or ``by_function``.

    Domain order (the order of weights everywhere downstream): the declared ``domains`` when given
    (for ``by_rules``: the rule names, then the default); otherwise the domains discovered in the
    data, **sorted** by name so the order does not depend on the data order.

    Args:
        assign_fn: ``example -> domain name``.
        domains: the declared domains; an example assigned to another name is an error.
        name: description used in ``repr``.

    Examples:
        >>> part = DomainPartitioner.by_rules({"code": r"\\.py$", "docs": r"\\.md$"}, field="source")
        >>> part.assign({"source": "setup.py"})
        'code'
        >>> data = [{"source": f"f{i}.py"} for i in range(5)] + [{"source": f"d{i}.md"} for i in range(5)]
        >>> splits = part.split(data, validation_size=2)
        >>> {d: (len(splits.train[d]), len(splits.validation[d])) for d in splits.domains}
        {'code': (3, 2), 'docs': (3, 2)}
    """

    def __init__(
        self,
        assign_fn: Callable[[Mapping[str, Any]], str],
        *,
        domains: Sequence[str] | None = None,
        name: str = "function",
    ) -> None:
        if not callable(assign_fn):
            raise TypeError(f"DomainPartitioner: assign_fn must be callable; got {type(assign_fn).__name__}.")
        self._assign_fn = assign_fn
        self._declared: tuple[str, ...] | None = self._check_domains("DomainPartitioner", domains)
        self._seen: set[str] = set()
        self._name = name
        self._field: str | None = None  # by_field's key: the column fast path for datasets.Dataset

    @staticmethod
    def _check_domains(fn: str, domains: Sequence[str] | None) -> tuple[str, ...] | None:
        if domains is None:
            return None
        if isinstance(domains, str) or not all(isinstance(d, str) for d in domains):
            raise TypeError(f"{fn}: domains must be a sequence of str; got {domains!r}.")
        if len(domains) == 0 or len(set(domains)) != len(domains):
            raise ValueError(f"{fn}: domains must be a non-empty list of unique names; got {list(domains)!r}.")
        return tuple(domains)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def by_field(cls, field: str = "domain", domains: Sequence[str] | None = None) -> DomainPartitioner:
        """Domain = the value of ``example[field]`` (a str).

        Args:
            field: the key holding the domain name.
            domains: declared domains (optional); others are errors.
        """
        if not isinstance(field, str):
            raise TypeError(f"DomainPartitioner.by_field: field must be a str; got {type(field).__name__}.")

        def assign(example: Mapping[str, Any]) -> str:
            value = _field_value(example, field)
            if not isinstance(value, str):
                raise TypeError(
                    f"DomainPartitioner.assign: example[{field!r}] must be a str domain name (map other values "
                    f"with DomainPartitioner.by_function); got {value!r}."
                )
            return value

        part = cls(assign, domains=domains, name=f"by_field({field!r})")
        part._field = field
        return part

    @classmethod
    def by_rules(
        cls,
        rules: Mapping[str, str | re.Pattern[str]],
        field: str = "source",
        default: str | None = None,
    ) -> DomainPartitioner:
        """Domain = the first rule (in mapping order) whose regex ``re.search``-es ``example[field]``.

        Args:
            rules: domain name -> regular expression.
            field: the key holding the string the rules match (e.g. a file path).
            default: domain of examples no rule matches; None makes them an error.

        The declared domains are the rule names, then ``default``.
        """
        fn = "DomainPartitioner.by_rules"
        if not isinstance(rules, Mapping) or not rules:
            raise ValueError(f"{fn}: rules must be a non-empty mapping domain -> regex; got {rules!r}.")
        compiled: list[tuple[str, re.Pattern[str]]] = []
        for name, pattern in rules.items():
            if not isinstance(name, str):
                raise TypeError(f"{fn}: rules keys must be domain names (str); got {name!r}.")
            try:
                compiled.append((name, re.compile(pattern) if isinstance(pattern, str) else pattern))
            except re.error as e:
                raise ValueError(
                    f"{fn}: rules[{name!r}] must be a valid regular expression; got {pattern!r} ({e})."
                ) from None
        if default is not None and not isinstance(default, str):
            raise TypeError(f"{fn}: default must be a str or None; got {default!r}.")
        domains = list(rules)
        if default is not None and default not in domains:
            domains.append(default)

        def assign(example: Mapping[str, Any]) -> str:
            value = _field_value(example, field)
            text = str(value)
            for name, rx in compiled:
                if rx.search(text):
                    return name
            if default is not None:
                return default
            raise ValueError(
                f"DomainPartitioner.assign: example[{field!r}] must match one of the rules {list(rules)} "
                f"(or pass default=); got {value!r}."
            )

        return cls(assign, domains=domains, name=f"by_rules({list(rules)}, field={field!r})")

    @classmethod
    def by_function(
        cls, fn: Callable[[Mapping[str, Any]], str], domains: Sequence[str] | None = None
    ) -> DomainPartitioner:
        """Domain = ``fn(example)`` (must return a str).

        Args:
            fn: ``example -> domain name``.
            domains: declared domains (optional); others are errors.
        """
        if not callable(fn):
            raise TypeError(f"DomainPartitioner.by_function: fn must be callable; got {type(fn).__name__}.")

        def assign(example: Mapping[str, Any]) -> str:
            value = fn(example)
            if not isinstance(value, str):
                raise TypeError(f"DomainPartitioner.assign: fn must return a str domain name; got {value!r}.")
            return value

        return cls(assign, domains=domains, name=f"by_function({getattr(fn, '__name__', 'fn')})")

    # ------------------------------------------------------------------ assignment
    @property
    def domains(self) -> tuple[str, ...]:
        """Declared domains in their order, else the domains seen so far, sorted."""
        if self._declared is not None:
            return self._declared
        return tuple(sorted(self._seen))

    def assign(self, example: Mapping[str, Any]) -> str:
        """The domain name of one example (an error if it is not a declared domain)."""
        name = self._assign_fn(example)
        if self._declared is not None:
            if name not in self._declared:
                raise ValueError(
                    f"DomainPartitioner.assign: domain must be one of the declared domains {list(self._declared)}; "
                    f"got unknown domain {name!r}."
                )
        else:
            self._seen.add(name)
        return name

    def _assign_all(self, data: Any, fn: str) -> list[str]:
        ds_cls, it_cls = _datasets_classes()
        if _is_instance(data, it_cls):
            raise TypeError(
                f"{fn}: data must be indexable (a datasets.Dataset or a sequence of dicts); got an IterableDataset "
                "(use split(..., validation_fraction=...) for streaming data)."
            )
        field = self._field
        if field is not None and _is_instance(data, ds_cls) and field in data.column_names:
            examples: Iterable[Any] = ({field: v} for v in data[field])
        elif _is_instance(data, ds_cls) or (isinstance(data, Sequence) and not isinstance(data, (str, bytes))):
            examples = data
        else:
            raise TypeError(
                f"{fn}: data must be a datasets.Dataset, IterableDataset or a sequence of dicts; got {type(data).__name__}."
            )
        return [self.assign(ex) for ex in examples]

    def _group(self, names: Sequence[str]) -> dict[str, list[int]]:
        """``domain -> indices`` in domain order (declared, else sorted) and data order."""
        order = self._declared if self._declared is not None else sorted(set(names))
        out: dict[str, list[int]] = {d: [] for d in order}
        for i, n in enumerate(names):
            out[n].append(i)
        return out

    def partition(self, data: Any) -> dict[str, list[int]]:
        """Indices of each domain's examples, in data order.

        Args:
            data: a ``datasets.Dataset`` or a sequence of dicts.

        Returns:
            ``name -> list of indices`` for every domain in order (declared domains without
            examples map to empty lists).
        """
        return self._group(self._assign_all(data, "DomainPartitioner.partition"))

    # ------------------------------------------------------------------ splitting
    def split(
        self,
        data: Any,
        validation_size: int = 500,
        *,
        validation_fraction: float | None = None,
        seed: int = 0,
        key: str | KeyFn | None = None,
    ) -> DomainSplits:
        """Stable per-domain train/validation split.

        Each example gets ``h = blake2b(seed, key)`` in ``[0, 1)``; ``key`` is ``example["id"]``
        if present, else the example's JSON (sorted keys), or the given field name / function.

        * ``validation_fraction=f``: validation iff ``h < f``. An example's side never changes
          when data is added or removed. Works on ``datasets.IterableDataset`` (lazy ``filter``;
          needs declared domains, and empty domains are not detected).
        * otherwise ``validation_size=n``: the n examples of each domain with the smallest ``h``
          (ties by position). Adding data can move a validation example to train, never a train
          example to validation. Needs map-style data.

        Args:
            data: ``datasets.Dataset``, ``datasets.IterableDataset`` or a sequence of dicts.
            validation_size: examples per domain in validation (paper: 500); ignored when
                ``validation_fraction`` is given.
            validation_fraction: fraction in ``(0, 1)`` for the threshold rule.
            seed: seed of the hash.
            key: field name or ``example -> key`` function identifying an example.

        Returns:
            ``DomainSplits``: ``datasets`` inputs give ``.select``-ed (or ``.filter``-ed)
            datasets; sequences give lists of examples.

        Raises:
            ValueError: a domain with too few examples for its validation set and a non-empty
                train set, a declared domain without examples, an unknown domain.
        """
        fn = "DomainPartitioner.split"
        if validation_fraction is not None:
            if (
                not isinstance(validation_fraction, (int, float))
                or isinstance(validation_fraction, bool)
                or not 0.0 < validation_fraction < 1.0
            ):
                raise ValueError(f"{fn}: validation_fraction must be in (0, 1); got {validation_fraction!r}.")
        elif not isinstance(validation_size, int) or isinstance(validation_size, bool) or validation_size < 1:
            raise ValueError(f"{fn}: validation_size must be an int >= 1 (paper: 500); got {validation_size!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"{fn}: seed must be an int; got {seed!r}.")
        if key is not None and not (isinstance(key, str) or callable(key)):
            raise TypeError(f"{fn}: key must be a field name, a function or None; got {type(key).__name__}.")

        ds_cls, it_cls = _datasets_classes()
        if _is_instance(data, it_cls):
            return self._split_iterable(data, validation_fraction, seed, key)
        is_ds = _is_instance(data, ds_cls)
        if not is_ds and (not isinstance(data, Sequence) or isinstance(data, (str, bytes))):
            raise TypeError(
                f"{fn}: data must be a datasets.Dataset, IterableDataset or a sequence of dicts; got {type(data).__name__}."
            )

        names: list[str] = []
        hashes: list[float] = []
        for ex in data:
            names.append(self.assign(ex))
            hashes.append(stable_unit_hash(_example_key(ex, key), seed))
        per = self._group(names)
        domains = tuple(per)
        empty = [d for d in domains if not per[d]]
        if empty:
            raise ValueError(f"{fn}: every declared domain must have examples; got none for {empty}.")

        train_idx: dict[str, list[int]] = {}
        val_idx: dict[str, list[int]] = {}
        for d in domains:
            idx = per[d]
            if validation_fraction is not None:
                val = [i for i in idx if hashes[i] < validation_fraction]
                if not val or len(val) == len(idx):
                    side = "validation" if not val else "train"
                    raise ValueError(
                        f"{fn}: domain {d!r} must have examples in both train and validation with "
                        f"validation_fraction={validation_fraction}; got an empty {side} set from {len(idx)} examples."
                    )
            else:
                if len(idx) <= validation_size:
                    raise ValueError(
                        f"{fn}: domain {d!r} must have more than validation_size={validation_size} examples "
                        f"(so that its train set is not empty); got {len(idx)}."
                    )
                val = sorted(sorted(idx, key=lambda i: (hashes[i], i))[:validation_size])
            val_set = set(val)
            val_idx[d] = val
            train_idx[d] = [i for i in idx if i not in val_set]

        if is_ds:
            train = {d: data.select(train_idx[d]) for d in domains}
            validation = {d: data.select(val_idx[d]) for d in domains}
        else:
            train = {d: [data[i] for i in train_idx[d]] for d in domains}
            validation = {d: [data[i] for i in val_idx[d]] for d in domains}
        return DomainSplits(train=train, validation=validation, domains=domains)

    def _split_iterable(self, data: Any, fraction: float | None, seed: int, key: str | KeyFn | None) -> DomainSplits:
        fn = "DomainPartitioner.split"
        if fraction is None:
            raise ValueError(
                f"{fn}: validation_fraction must be given for a datasets.IterableDataset (a per-domain count "
                "needs a full pass over the data); got validation_fraction=None."
            )
        if self._declared is None:
            raise ValueError(
                f"{fn}: domains must be declared for a datasets.IterableDataset (by_field(..., domains=[...]), "
                "by_function(..., domains=[...]) or by_rules); got domains=None."
            )

        def keep(domain: str, validation: bool) -> Callable[[Mapping[str, Any]], bool]:
            def pred(ex: Mapping[str, Any]) -> bool:
                if self.assign(ex) != domain:
                    return False
                return (stable_unit_hash(_example_key(ex, key), seed) < fraction) == validation

            return pred

        domains = self._declared
        train = {d: data.filter(keep(d, False)) for d in domains}
        validation = {d: data.filter(keep(d, True)) for d in domains}
        return DomainSplits(train=train, validation=validation, domains=domains)

    def __repr__(self) -> str:
        return f"DomainPartitioner.{self._name}"
