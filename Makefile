# showtell: `make demo` runs the whole pipeline on the built-in sample, `make test` runs ruff + the tests,
# `make test-fast` ruff + the tests not marked slow (the edit loop).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2
PYTEST_WORKERS ?= 2

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@start=$$(date +%s); \
	$(PY) -m pip install --quiet --upgrade pip && \
	$(PY) -m pip install --quiet -e '.[dev]' && \
	echo "environment ready in $$(( $$(date +%s) - start )) s ($(VENV))"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) cli.py demo --workdir demo_run

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	@rm -f .pytest-exit-code
	@$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=10; rc=$$?; echo $$rc > .pytest-exit-code; exit $$rc

test-fast: lint
	@start=$$(date +%s); \
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" --durations=5; rc=$$?; \
	echo "test-fast: $$(( $$(date +%s) - start )) s (make test runs the slow tests too)"; exit $$rc

bench: $(STAMP)
	$(PY) bench/beam.py
	$(PY) bench/extract.py
	$(PY) bench/train_decoder.py
	$(PY) bench/scst.py
	$(PY) bench/export.py

clean:
	rm -rf $(VENV) demo_run build *.egg-info .pytest_cache .ruff_cache
