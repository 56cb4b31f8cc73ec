# One entry point for contributors and CI. `make run` and `make test` set everything up
# on a fresh machine (a virtualenv in .venv from the pinned requirements) and then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: help setup run test lint format check synth clean bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m tierserve.tools.local.emulator  # the Lambda Runtime Interface Emulator binary, from the aws-sam-cli wheel
	touch $(STAMP)

setup: $(STAMP) ## create .venv with the pinned requirements

run: $(STAMP) ## the local API on sample models, embedded S3, http://127.0.0.1:3000 (or $PORT)
	$(BIN)/tierserve local

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) ## lint and format check, then the whole test suite (unit, integration, infra)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

check: test ## what CI runs

synth: $(STAMP) ## cdk synth with the pinned CDK CLI (needs npm)
	npm ci --silent
	PATH=$(abspath $(BIN)):$$PATH npx cdk synth --quiet

bench: $(STAMP) ## benchmarks under bench/ (not part of the test run)
	$(BIN)/python -m bench

clean: ## remove the virtualenv, caches and cdk.out
	rm -rf $(VENV) cdk.out .tierserve .pytest_cache .ruff_cache
