# One command each on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARTIFACTS := artifacts
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test test-all demo bench lint format clean

setup: $(STAMP)

# torch first, from the local CPU wheel: otherwise pip resolves a multi-GB CUDA build.
# transformers.js and puppeteer-core (pinned in js/package-lock.json) for the transformers.js and web
# pack tests: scripts are ignored, since onnxruntime-node's would download CUDA binaries (its CPU
# binary is in the package). Debian's chromium is the browser puppeteer-core drives (it downloads none).
$(STAMP): pyproject.toml js/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[export,quantize,serve,label,ray,dev]'
	if command -v npm >/dev/null; then cd js && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: transformers.js not installed in js/"; fi
	command -v chromium >/dev/null || $(SUDO) sh -c 'apt-get update -q && apt-get install -y -q chromium' \
	  || echo "chromium not installed: the browser test (tests/test_pack_web.py) will fail"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python tools/demo.py --out $(ARTIFACTS)/demo

# Full-size base with random weights: builds, exports and quantizes on first use (cached), then times
# flonnx against its peers (PyTorch fp32/bf16, transformers.js in Node from js/node_modules); see docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/flonnx bench --size base --threads 2 --out $(ARTIFACTS)/bench --cache $(ARTIFACTS)/bench/cache

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(ARTIFACTS) .pytest_cache .ruff_cache
