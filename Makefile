# The two commands that matter: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench screenshots clean

setup: $(STAMP)

# torch first, pinned to the CPU build on disk: otherwise pip resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,serve,data]'
	touch $(STAMP)

demo: setup
	$(BIN)/python -m kotonoha.demo

test: setup
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
