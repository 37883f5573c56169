# The index of the project: every command a person runs. `make help` lists them.
# `make run` and `make test` each do all the set-up on a fresh clone (venv, install, certs,
# keys, databases), so nothing has to be prepared by hand.

SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
# The SAST gate: bandit fails the build on any high-severity finding. SAST_DEPS= lets a test
# run the gate on a copy of the tree without installing that copy into the venv.
SAST_PATHS ?= gateway upstream empsecrets emparchive
SAST_DEPS ?= venv
# Test processes: each runs whole test files (their module-scoped servers stay in one process).
TEST_WORKERS ?= 2

.PHONY: help venv setup run test test-deps test-policy lint sast bench eval-anomaly clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP) ## create .venv and install the project with its dev tools

setup: venv ## create dev certs, signing key, upstream secret and databases in var/ (idempotent)
	$(PY) -m gateway setup
	$(PY) -m upstream db init

run: setup ## run the upstream and the gateway in the foreground until Ctrl-C
	PYTHON=$(PY) scripts/run-dev.sh

test-policy: venv ## run the Rego tests beside the policy
	$(PY) -m gateway policy test

test-deps: ## the servers and browser the tests start themselves: Debian's redis-server, rsyslog and chromium, npm's oidc-provider
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	@(command -v rsyslogd || test -x /usr/sbin/rsyslogd) >/dev/null && dpkg -s rsyslog-gnutls >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq rsyslog rsyslog-gnutls)
	@command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)
	@command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	@command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	tests/fixtures/oidc_provider/install.sh

test: venv test-deps test-policy ## the Rego tests and the whole pytest suite (real TLS, Redis, an OIDC provider)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

sast: $(SAST_DEPS) ## bandit over the code: non-zero on any high-severity finding
	$(BIN)/bandit --quiet --configfile pyproject.toml --recursive $(SAST_PATHS) --severity-level high

lint: venv sast ## ruff (lint + format check), mypy strict, bandit gate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup ## throughput vs a bare proxy, the 50 req/s load test, policy and schema micro-benchmarks, console pages, encryption cost
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) \
		|| echo "wrk not installed: bench/run.py falls back to its Python load generator"
	$(PY) bench/run.py
	$(PY) bench/console.py
	$(PY) bench/encryption.py
	$(PY) bench/eval_anomaly.py

eval-anomaly: venv ## outlier detection quality (precision/recall per method) and per-record cost
	$(PY) bench/eval_anomaly.py

clean: ## remove generated state (var/) and caches; keeps .venv
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
