# Two commands: `make demo` runs the offline default federation, `make test` lints (ruff), builds the docs and runs
# the test suite.
# Both create the virtual environment first. torch is pinned before anything that depends on it:
# an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

# --federation.overwrite true: a second `make demo` starts over in runs/tiny (fit alone refuses to mix runs).
demo: install
	$(PY) -m firm_lightning fit --config $(CONFIG) --federation.overwrite true

# The linter (ruff, configured in pyproject.toml), the docs site (strict: a broken page, link, anchor or
# reference fails; not --quiet, which hides the configuration-reference hook's warnings from strict mode),
# then the tests; tests/test_docs.py opens the site just built in a headless browser.
test: install
	$(PY) -m ruff check firm_lightning tests benchmarks scripts docs/hooks
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site
	FIRM_DOCS_SITE=build/site $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
