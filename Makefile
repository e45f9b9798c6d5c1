# Two commands: `make demo` (the embedded demo) and `make test` (the tests).
# Each creates or reuses .venv and installs exactly the versions in requirements-lock.txt (with uv),
# and torch from TORCH_SPEC (also with uv). GPU users pick their torch build:
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# `make lock` refreshes the lock from pyproject.toml's ranges (see docs/architecture.md).
SHELL := bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
UV_VERSION ?= 0.13.8
LOCK := requirements-lock.txt
# Where the lock's resolution finds torch's CPU wheel (its dependencies are locked; torch itself is not).
TORCH_LOCK_SOURCE ?= --find-links /opt/wheels
BIN := $(VENV)/bin
STAMP := $(VENV)/.polyalign-installed
UV := $(BIN)/uv

.PHONY: demo test test-fast test-avx2 install lock browser clean-venv

$(UV):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)

# uv installs torch too (~5 s against pip's ~30 s for the same wheel); it does not read pip's config, so
# the wheel folders pip is told about (PIP_FIND_LINKS, else pip's find-links setting) are passed on.
TORCH_FIND_LINKS ?= $(foreach d,$(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)),--find-links $(d))

$(STAMP): pyproject.toml $(LOCK) | $(UV)
	$(UV) pip install -q --python $(BIN)/python $(TORCH_SPEC) $(TORCH_FIND_LINKS) -c $(LOCK)
	$(UV) pip install -q --python $(BIN)/python --no-deps -r $(LOCK)
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra test --universal --python-version 3.11 --no-header \
	  $(TORCH_LOCK_SOURCE) --override <(echo "torch==2.13.0+cpu") --no-emit-package torch -o $(LOCK).new
	{ echo "# Exact versions for make demo / make test; refresh with: make lock (torch: TORCH_SPEC)"; \
	  cat $(LOCK).new; } > $(LOCK) && rm $(LOCK).new

demo: $(STAMP)
	$(BIN)/polyalign run --demo

# The report's browser test renders report.html in headless Chromium (Debian's package); best effort:
# without apt or root the test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will skip"; }

# The whole suite natively, then the tests of CPU-kernel-specific paths again as an AVX2-only CPU runs
# them (torch's and oneDNN's kernels capped to AVX2), so that a machine with more checks that class too.
KERNEL_TESTS := tests/test_hardware.py tests/test_scoring.py tests/test_runner.py tests/test_lens.py tests/test_train.py

test: $(STAMP) browser
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-avx2

# The inner loop (under a minute): no multi-process runs, no slow tests, no real Gemma (markers in pyproject).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gemma" --durations=20

test-avx2: $(STAMP)
	@if [ "$$(uname -m)" = x86_64 ]; then \
	  echo "== again as an AVX2-only CPU: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"; \
	  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q -m "not slow" $(KERNEL_TESTS); \
	else echo "== AVX2-restricted run: x86_64 only, skipped on $$(uname -m)"; fi

clean-venv:
	rm -rf $(VENV)
