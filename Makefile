# Every target bootstraps .venv (torch, torchvision, the package and its C++ extension) first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dcnv2-installed
SOURCES := pyproject.toml setup.py $(shell find src/dcnv2/ops/csrc -name '*.cpp' 2>/dev/null)

.PHONY: install test test-all demo bench docs clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check setuptools wheel ninja
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[test,docs]'
	touch $(STAMP)

# two pytest-xdist workers of one thread each, a test file per worker at a time (module fixtures built once);
# the long end-to-end tests are marked slow: `make test-slow` runs them, `make test-all` runs everything
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m ''

demo: $(STAMP)
	$(PY) -m dcnv2.cli demo

# the documentation site (mkdocs.yml): docs/ and the API pages, warnings as errors, into build/site
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/deform_conv.py
	$(PY) benchmarks/deform_roi_pool.py

clean:
	rm -rf build $(VENV) src/*.egg-info src/dcnv2/*.so
