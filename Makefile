# Two commands: `make demo` runs the offline default federation, `make test` lints (ruff), builds the docs and runs
# the test suite.
# Both create the virtual environment first. torch is pinned before anything that depends on it:
# an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml

.PHONY: install demo test results clean

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

# The docs' cheap results (the demo's numbers and figures): rerun and rewrite docs/results/tiny_demo.json and
# docs/tiny_*.png (scripts/refresh_results.py; the docs build renders the tables from the file).
results: install
	$(PY) scripts/refresh_results.py

# The linter (ruff, configured in pyproject.toml), the docs site (strict: a broken page, link, anchor or
# reference fails; not --quiet, which hides the configuration-reference hook's warnings from strict mode),
# then the tests; tests/test_docs.py opens the site just built in a headless browser. The tests run in one
# process per core (pytest-xdist; an idle process takes tests from a busy one, which balances the few long
# end-to-end tests: 744 s against 812 s with a file per process here), each with one torch thread: tiny
# models on threads that wait for each other are many times slower.
test: install
	$(PY) -m ruff check firm_lightning tests benchmarks scripts docs/hooks
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site
	FIRM_DOCS_SITE=build/site OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist worksteal

clean:
	rm -rf $(VENV) runs
