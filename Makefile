# lavise: `make demo` serves the dashboard, `make test` runs the whole suite. Both are safe to run twice.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8501
DATA   := data/synthbirds
MODEL  := models/synthbirds_cnn.safetensors
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: install data assets demo serve test lint bench browser clean-data

## install: the virtual environment with every pinned package and lavise itself (editable).
## uv (pinned) downloads and unpacks in parallel and compiles the byte code on both cores: about 1 min on this
## machine against 3 min for pip; where uv cannot be installed or cannot reach the index, pip does it all.
UV := uv==0.13.8
install: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned packages into $(VENV) (about 1 min with uv, 3 min with pip)"
	@{ $(BIN)/pip install --disable-pip-version-check -q $(UV) \
	   && $(BIN)/uv pip install --python $(BIN)/python --no-cache --compile-bytecode -q -r requirements.txt; } \
	 || $(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	@rm -f $(VENV)/.installed-* && touch $@

## browser: Debian's Chromium for the real-browser tests (playwright drives it; no browser download)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

## data: SynthBirds and the demo CNN (committed; retrained only if missing)
data: install
	@test -f $(DATA)/manifest.jsonl || $(BIN)/lavise synthbirds --out $(DATA) --workers 2
	@test -f $(MODEL) || $(BIN)/lavise train-demo --data $(DATA) --out models

## assets: the data and the whole default bundle
assets: data
	$(BIN)/lavise build --model synthbirds --data $(DATA)

## demo: serve the dashboard on http://localhost:$(PORT), to this machine only (127.0.0.1), as soon as the
## probe pass is done; the other stages build behind it and each page lights up when its stage is done
demo: data
	$(BIN)/lavise demo --model synthbirds --data $(DATA) --port $(PORT)

## serve: serve the dashboard to others, read-only (make serve HOST=0.0.0.0; ARGS=--allow-build lets them build)
HOST ?= 127.0.0.1
serve: assets
	$(BIN)/lavise serve --host $(HOST) --port $(PORT) $(ARGS)

## test: the whole suite (unit, app and browser tests), in TEST_WORKERS processes (pytest-xdist); a test module
## stays in one process (--dist loadscope), so its dashboard server, Ray runtime and bundles start once
TEST_WORKERS ?= 2
test: assets browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## bench: every benchmark; each prints its ratios / latencies measured side by side in one run
bench: assets
	$(BIN)/python bench/probe_overhead.py
	$(BIN)/python bench/probe_memory.py
	$(BIN)/python bench/explain_upload.py
	$(BIN)/python bench/concept_query.py
	$(BIN)/python bench/head_training.py
	$(BIN)/python bench/ui_latency.py
	$(BIN)/python bench/synthbirds_budget.py
	$(BIN)/python bench/ray_probe.py
	$(BIN)/python bench/gpu_probe.py
	$(BIN)/python bench/attribution.py
	$(BIN)/python bench/featurevis.py
	$(BIN)/python bench/serve_load.py

clean-data:
	rm -rf data/bundles data/cache
