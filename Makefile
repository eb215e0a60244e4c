# lsoftmax-serve: `make demo` runs the pipeline on built-in defaults, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install.stamp
OUT ?= runs/demo

.PHONY: install test test-all test-slow demo data protos clean

install: $(STAMP)

# Re-install only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Fast tests; `cuda` tests run only where a GPU is present (they skip themselves otherwise).
test: install
	$(PY) -m pytest -m "not slow" -q

test-slow: install
	$(PY) -m pytest -m slow -q

test-all: install
	$(PY) -m pytest -q

data: install
	$(PY) -m training.data

protos: install
	$(PY) -m serving.protos_gen

# The whole pipeline: data -> train (fast, m=4) -> export -> serve -> classify 10k digits -> embed -> plot.
demo: install
	$(PY) scripts/demo.py --out $(OUT)

clean:
	rm -rf $(VENV) runs model_repository .pytest_cache
