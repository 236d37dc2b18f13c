# opensig: `make demo` runs the whole pipeline on the bundled digits; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE ?= 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test lint clean

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

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests pipelines
	$(BIN)/ruff format --check src tests pipelines

clean:
	rm -rf artifacts reports/plots reports/train mlflow.db mlruns mlartifacts
