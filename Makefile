# airflow-mlops: every target sets itself up from a fresh clone (venv, locked install, state folder).
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
STATE := $(CURDIR)/state

# The embedded default: Airflow's home, its database (a PostgreSQL the demo starts in ./state/postgres, no
# root needed) and every artifact live in ./state.
export AIRFLOW_HOME := $(STATE)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__EXECUTOR := LocalExecutor
export AIRFLOW__MLOPS__STATE_DIR := $(STATE)
export PATH := $(BIN):$(PATH)

.PHONY: install ui-bundle system-packages demo test test-unit lint bench ui prepare down clean-state help

help:
	@echo "make demo   - set up everything and run the demo on the embedded default"
	@echo "make test   - set up everything and run the test suite"
	@echo "make test-unit - the unit tests only (a few minutes; the fast loop)"
	@echo "make ui     - Airflow UI (airflow standalone) on the demo's state, with the MLOps Models pages"
	@echo "make down   - stop the demo's PostgreSQL (make demo / make ui start it)"
	@echo "make ui-bundle - build the React pages (airflow_mlops/plugins/ui/dist/main.js) with npm"
	@echo "make lint | make bench | make install | make clean-state"

# Installed when the lock or the project metadata changes; uv installs exactly what the lock says.
$(BIN)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
	$(BIN)/uv pip sync --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	@# the editable build leaves setuptools' airflow_mlops.egg-info here: with the clone on sys.path (`python -m`
	@# or `python -c` run from it) it is a second airflow-mlops distribution, and Airflow loads the UI plugin's
	@# entry point twice ("Plugin 'airflow_mlops' already registered", a plugin import error); the installed
	@# metadata is the dist-info in the venv
	rm -rf airflow_mlops.egg-info
	touch $@

# The pages inside Airflow's UI: a React bundle (airflow_mlops/plugins/ui/dist/main.js, not committed) built
# with npm from its lock (npm ci, when the lock changed) and Vite (when a source changed). Needs Node >= 20.19.
UI_DIR := airflow_mlops/plugins/ui
UI_BUNDLE := $(UI_DIR)/dist/main.js
UI_SOURCES := $(UI_DIR)/package.json $(UI_DIR)/vite.config.ts $(UI_DIR)/tsconfig.json $(wildcard $(UI_DIR)/src/*.ts* $(UI_DIR)/src/*/*.ts*)

$(UI_DIR)/node_modules/.installed: $(UI_DIR)/package-lock.json
	@node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a==20&&b>=19)?0:1)' \
	  || (echo "the UI bundle needs Node.js >= 20.19 and npm (found: $$(node --version 2>&1))" >&2; exit 1)
	cd $(UI_DIR) && npm ci --no-audit --no-fund
	touch $@

$(UI_BUNDLE): $(UI_DIR)/node_modules/.installed $(UI_SOURCES)
	cd $(UI_DIR) && npm run build

ui-bundle: $(UI_BUNDLE)

install: $(BIN)/.installed $(UI_BUNDLE)

prepare: $(BIN)/.installed
	$(BIN)/python -m airflow_mlops.demo prepare --cadence weekly

# Airflow's metadata database: PostgreSQL in $(STATE)/postgres, created, started and migrated by the demo
demo: $(BIN)/.installed system-packages
	$(BIN)/python -m airflow_mlops.demo run

# Debian packages besides Python's: PostgreSQL 15 (the demo's Airflow database; the shared-state and
# scaled-topology tests), iproute2 (the scaled topology's network namespaces) and chromium (the headless
# browser the UI tests and benchmark drive through Playwright); installed only when missing
system-packages:
	@test -x /usr/lib/postgresql/15/bin/initdb && command -v ip > /dev/null && command -v chromium > /dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 iproute2 chromium)

test: install system-packages
	$(BIN)/python -m pytest -n 2 tests

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check airflow_mlops dags tests benchmarks
	$(BIN)/lint-imports
	cd $(UI_DIR) && npm run typecheck

bench: install
	$(BIN)/python benchmarks/bench_dag_parse.py

ui: prepare system-packages $(UI_BUNDLE)
	@echo "Airflow UI: http://localhost:8080  (user 'admin'; password in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated)"
	@echo "The models, their versions, drift and validation: http://localhost:8080/plugin/mlops-models (MLOps Models in the navigation)"
	$(BIN)/python -m airflow_mlops.demo ui

down:
	@test ! -x $(BIN)/python || $(BIN)/python -m airflow_mlops.demo db --stop

clean-state: down
	rm -rf $(STATE)
