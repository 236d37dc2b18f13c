# opensig: `make demo` runs the whole pipeline on the bundled digits; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PATH := $(abspath $(BIN)):$(PATH)
PREFECT_PORT ?= 4200

.PHONY: install demo test lint clean retrain prefect-server

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: install
	$(BIN)/opensig demo-data --source digits --out data
	$(BIN)/dvc add -q data
	$(BIN)/dvc repro

retrain: install  ## the Prefect flow, once, no server needed
	$(BIN)/python pipelines/retrain.py

prefect-server: install  ## a local Prefect server for scheduled runs (then: export PREFECT_API_URL=...)
	@echo "export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api  # in the shell that serves the flow"
	PREFECT_UI_API_URL=$${PREFECT_UI_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api} \
	  $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests pipelines
	$(BIN)/ruff format --check src tests pipelines

clean:
	rm -rf artifacts reports/plots reports/train mlflow.db mlruns mlartifacts
