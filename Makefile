# One entry point for contributors and CI. `make run` and `make test` set everything up
# on a fresh machine (a virtualenv in .venv from the pinned requirements) and then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Defined before the rules that name it: make expands prerequisites as it reads them.
NODE_STAMP := node_modules/.package-lock.json
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: help setup run test lint format check synth clean bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt requirements-kserve.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-kserve.txt  # why: its header
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

test: $(STAMP) $(NODE_STAMP) ## lint and format check, then the whole test suite (unit, integration, infra, the pinned CDK CLI offline)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

check: test ## what CI runs

# The pinned CDK CLI, offline: no telemetry (cdk.json's cli-telemetry too), no notices (cdk.json's
# notices too), no version check, and no AWS credentials: the stacks are environment-agnostic,
# so synth needs no account, and the CLI would otherwise ask STS (or EC2 metadata) for one.
CDK_OFFLINE := env -u AWS_PROFILE -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
	-u AWS_WEB_IDENTITY_TOKEN_FILE -u AWS_CONTAINER_CREDENTIALS_RELATIVE_URI -u AWS_CONTAINER_CREDENTIALS_FULL_URI \
	AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true \
	CDK_DISABLE_CLI_TELEMETRY=true CDK_DISABLE_VERSION_CHECK=true PATH=$(abspath $(BIN)):$$PATH
SYNTH_ARGS ?=

$(NODE_STAMP): package.json package-lock.json
	npm ci --silent --no-audit --no-fund

synth: $(STAMP) $(NODE_STAMP) ## cdk synth with the pinned CDK CLI, offline (npm ci on first use; SYNTH_ARGS="-c key=value ...")
	$(CDK_OFFLINE) npx --no-install cdk synth --quiet --no-notices $(SYNTH_ARGS)

bench: $(STAMP) ## benchmarks under bench/ (not part of the test run)
	$(BIN)/python -m bench

clean: ## remove the virtualenv, caches and cdk.out
	rm -rf $(VENV) cdk.out .tierserve .pytest_cache .ruff_cache
