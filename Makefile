# Every target does its own set-up on a fresh machine: a virtual environment in .venv with the
# pinned development requirements (torch pinned to the CPU build) and ddk installed editable.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
EXT_STAMP := $(VENV)/.ext-built

export PYTHONHASHSEED := 0

.PHONY: setup ext demo demo-synthetic lint test test-all docs bench bench-gpu clean

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-dev.txt
	touch $(STAMP)

# The compiled extension is built in place (no build isolation, so it sees the pinned torch).
$(EXT_STAMP): $(STAMP) setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $(EXT_STAMP)

setup: $(EXT_STAMP)

ext: setup

# The main job on the bundled default: builds the 8-domain corpus from Debian/PyPI packages, trains
# the tokenizer, the teacher and a CE-pretrained student (all cached after the first run), then
# distills that student with KD and with DDK and prints both side by side. DEMO_ARGS passes flags
# (e.g. DEMO_ARGS="--data-dir /tmp/empty-cache" for a first run from an empty cache).
DEMO_ARGS ?=
demo: setup
	$(PY) -m ddk.recipes.cli demo-real $(DEMO_ARGS)

# KD vs DDK on synthetic Markov-chain domains: no downloads, about two minutes.
demo-synthetic: setup
	$(PY) -m ddk.recipes.cli demo

# House checks (pinned ruff and mypy; configured in pyproject.toml), run by `make test` first.
lint: setup
	$(PY) -m ruff check ddk ddk_kernels tests bench docs
	$(PY) -m ruff format --check ddk ddk_kernels tests bench docs
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -m "not slow" --timeout=900 $(PYTEST_ARGS)

test-all: setup
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q --timeout=3600 $(PYTEST_ARGS)

# The documentation site (MkDocs + mkdocstrings, from the docstrings) into site/; warnings fail.
# Griffe reads the sources statically, so the compiled extension is not needed.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench: setup
	$(PY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results/latest.json $(PYTEST_ARGS)
	$(PY) bench/report.py bench/results/latest.json

bench-gpu:
	bash bench/gpu/run.sh

clean:
	rm -rf $(VENV) build *.egg-info ddk_kernels/_C*.so .pytest_cache .hypothesis .benchmarks site
