# `make run` sets up a virtual environment and starts the app; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup run test test-fast lint browser clean interop

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade -q pip
	$(VENV)/bin/pip install -r requirements-dev.txt
	touch $@

# The browser tests drive Debian's Chromium (Playwright's own browser download needs the network).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

run: setup
	$(PY) app.py

test: setup browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not e2e"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-output

# SAELens interop: a separate environment (SAELens is not a dependency of the app or trainer).
BENCH_VENV ?= .venv-bench
interop:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	echo "torch==2.13.0" > $(BENCH_VENV)/constraints.txt
	$(BENCH_VENV)/bin/pip install -q -c $(BENCH_VENV)/constraints.txt torch==2.13.0 sae-lens pytest matplotlib
	$(BENCH_VENV)/bin/python -m pytest -q tests/sae/test_saelens_interop.py
