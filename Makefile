# tilefleet: two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

# The stamp depends on pyproject.toml, so editing dependencies reinstalls; otherwise this is a no-op.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'  # plot: the tests draw tilefleet sim --plot's PNG
	touch $(STAMP)

demo: venv
	$(VENV)/bin/tilefleet demo

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "unit and not slow"

bench: venv
	$(VENV)/bin/tilefleet bench --standard --out bench-results

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
