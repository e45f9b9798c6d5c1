# Two commands: `make demo` (the embedded demo) and `make test` (the tests).
# Each creates or reuses .venv and installs what it needs. GPU users pick their torch build:
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.polyalign-installed

.PHONY: demo test install browser clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/polyalign run --demo

# The report's browser test renders report.html in headless Chromium (Debian's package); best effort:
# without apt or root the test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will skip"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
