# Every target bootstraps .venv (torch, torchvision, the package and its C++ extension) first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dcnv2-installed
DOCS_STAMP := $(VENV)/.dcnv2-docs-installed
SOURCES := pyproject.toml setup.py $(shell find src/dcnv2/ops/csrc -name '*.cpp' 2>/dev/null)

.PHONY: install test test-all demo bench docs clean

install: $(STAMP)

PIP := $(PY) -m pip install -q --disable-pip-version-check
# requirements of pyproject.toml, one per line: `$(REQUIREMENTS) test` = the dependencies and the test extra
REQUIREMENTS := $(PY) -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print(*[r for g in sys.argv[1:] for r in (p['dependencies'] if g == 'run' else p['optional-dependencies'][g])], sep='\n')"

# torch first (the extension builds against it); then the extension compiles (2 cores) while pip fetches the
# other dependencies (network), about 40 s sooner than one after the other; its log is shown if it fails
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1 setuptools wheel ninja
	$(REQUIREMENTS) run test > $(VENV)/requirements-test.txt
	$(PIP) --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1 & build=$$!; \
	$(PIP) -r $(VENV)/requirements-test.txt; deps=$$?; \
	wait $$build || { cat $(VENV)/build.log; echo "the C++ extension did not build (log above)"; exit 1; }; \
	exit $$deps
	touch $(STAMP)

# the documentation tools (mkdocs-material, mkdocstrings): for `make docs` and the docs build test in test-slow
$(DOCS_STAMP): $(STAMP)
	$(REQUIREMENTS) docs > $(VENV)/requirements-docs.txt
	$(PIP) -r $(VENV)/requirements-docs.txt
	touch $(DOCS_STAMP)

# two pytest-xdist workers of one thread each, a test file per worker at a time (module fixtures built once);
# the long end-to-end tests are marked slow: `make test-slow` runs them, `make test-all` runs everything
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(DOCS_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow

test-all: $(DOCS_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m ''

demo: $(STAMP)
	$(PY) -m dcnv2.cli demo

# the documentation site (mkdocs.yml): docs/ and the API pages, warnings as errors, into build/site
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/deform_conv.py
	$(PY) benchmarks/deform_roi_pool.py

clean:
	rm -rf build $(VENV) src/*.egg-info src/dcnv2/*.so
