# VoiceAssist Mesh. `make run` and `make test` work on a fresh machine: they create the venv and install first.
SHELL := bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export BUF_CACHE_DIR := $(CURDIR)/build/buf-cache

.PHONY: setup run mesh gen check-gen vendor-protos lint test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@scripts/system-deps
	@touch $@

setup: $(BIN)/.installed  ## create the venv and install everything

run: setup  ## the whole system in one process (embedded mode) behind Envoy on :8080; Ctrl-C stops it
	$(BIN)/voiceassist up

mesh: setup  ## a control plane, <NAME>_WORKERS processes per service, Envoy over xDS; PostgreSQL and Redis from DATABASE_URL / REDIS_URL
	$(BIN)/voiceassist up --mesh

gen: setup  ## regenerate gen/ and envoy/ from proto/ and the service registry
	scripts/gen-protos
	$(BIN)/voiceassist envoy-config

check-gen: setup  ## fail when gen/ or envoy/ would change
	@rm -rf build/gen-check
	@scripts/gen-protos build/gen-check
	@diff -r -x __pycache__ gen build/gen-check || { echo "gen/ is stale: run make gen" >&2; exit 1; }
	@$(BIN)/voiceassist envoy-config --check

vendor-protos: setup  ## copy google/api and google/rpc protos from the pinned googleapis-common-protos wheel
	@for f in api/annotations api/http api/httpbody api/field_behavior rpc/status rpc/error_details rpc/code; do \
	  cp $$($(BIN)/python -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__file__)))')/$$f.proto \
	     third_party/googleapis/google/$$f.proto; done

lint: setup  ## buf lint + breaking, ruff, import boundaries, mypy (configured in pyproject.toml)
	$(BIN)/buf lint
	scripts/buf-breaking
	$(BIN)/ruff check services tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

test: check-gen lint  ## everything CI runs
	$(BIN)/pytest

test-fast: setup  ## the tests only
	$(BIN)/pytest -x -q

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@touch $@

bench: $(BIN)/.bench-installed  ## benchmarks (the bench group installs the FastAPI peer and py-spy); writes bench/results.md
	$(BIN)/python bench/run_all.py

clean:
	rm -rf build data
