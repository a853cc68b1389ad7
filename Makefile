# One-command entry points. Each target builds its own virtual environment
# (with the compiled core) on first use, so a fresh clone needs nothing else.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SOURCES := $(shell find src -name '*.py' -o -name '*.pyx' -o -name '*.pxd') pyproject.toml setup.py

.PHONY: venv test test-compiled test-pure demo bench bench-e2e clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	SAFE_FAST_REQUIRE_COMPILED=1 $(PY) -m pip install --quiet '.[test,bench,redis]' Cython
	$(PY) -c "import safe_fast; assert safe_fast.core_backend() == 'cython', 'compiled core missing'"
	touch $@

venv: $(VENV)/.installed

## The whole suite, once on the compiled core and once on the pure-Python core.
test: venv
	$(MAKE) test-compiled
	$(MAKE) test-pure

test-compiled: venv
	SAFE_FAST_REQUIRE_COMPILED=1 $(PY) -m pytest -q

test-pure: venv
	SAFE_FAST_PURE_PYTHON=1 $(PY) -m pytest -q

## The main job: a demo server to watch in a browser (the inspector), on the in-memory default.
## Serves until Ctrl-C; DEMO_SECONDS=N stops it after N seconds.
demo: venv
	$(PY) -m safe_fast.examples.demo

## Micro benchmarks (pytest-benchmark), both cores.
bench: venv
	$(PY) -m pytest benchmarks --benchmark-only -q

## End-to-end fan-out comparison against the peers.
bench-e2e: venv
	$(PY) benchmarks/fanout_e2e.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/safe_fast/_core.c src/safe_fast/*.so
