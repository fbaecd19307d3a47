# Two set-up commands: `make demo` and `make test`. Both build .venv from nothing when needed.
# `make check` (format check, lint, type check, tests) is what CI runs, through .ci/run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test check lint typecheck format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/arbiter demo --port $${ARBITER_PORT:-8080} --info-file demo-info.json

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests examples bench
	$(VENV)/bin/ruff check src tests examples bench

# pyproject.toml [tool.pyright]: src/ strict, tests/ standard, in one run.
typecheck: $(STAMP)
	$(VENV)/bin/pyright

check: lint typecheck test

format: $(STAMP)
	$(VENV)/bin/ruff format src tests examples bench
	$(VENV)/bin/ruff check --fix src tests examples bench

bench: $(STAMP)
	$(PY) bench/passthrough.py

clean:
	rm -rf $(VENV) .cache .arbiter-demo demo-info.json .pytest_cache .ruff_cache
