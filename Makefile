# opensig: `make demo` runs the whole pipeline on the bundled digits; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PATH := $(abspath $(BIN)):$(PATH)
PREFECT_PORT ?= 4200
TEST_WORKERS ?= 2  # e2e tests train real models: about 2 GB of memory each

.PHONY: install demo test lint clean retrain prefect-server offline-plots check-model-env

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

# Files go out in collection order (tests/e2e first: the slowest), not xdist's default of the
# most tests first, which left the one-test e2e files for last on one worker (bench/README.md)
test: install  ## whole test files spread over TEST_WORKERS processes (pytest-xdist); lists the 15 slowest
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations 15

# Opt-in, not part of `make test` (which skips it): a fresh venv gets only a registered
# model's requirements.txt (about 4 GB from PyPI: torch and its CUDA libraries), then loads
# the model and predicts an image, so a missing or broken pin shows before a deployment does.
check-model-env: install
	OPENSIG_CHECK_MODEL_ENV=1 $(BIN)/python -m pytest -q -p no:xdist tests/e2e/test_model_env.py

lint: install
	$(BIN)/ruff check src tests pipelines
	$(BIN)/ruff format --check src tests pipelines

# .dvc/plots/offline.html, the page `dvc plots show` fills (.dvc/config: plots.html_template):
# vega, vega-lite and vega-embed inlined, unmodified, with their licences, in the versions
# dvc_render's VegaRenderer would load from a CDN, so the plots draw offline. Rebuild it
# (needs the npm registry) when dvc-render changes those versions.
VEGA_PACKAGES := vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
offline-plots:
	@tmp=$$(mktemp -d) && cd $$tmp && npm pack -q $(VEGA_PACKAGES) >/dev/null && cd $(CURDIR) && \
	{ printf '<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<title>DVC Plot</title>\n'; \
	  for pkg in $(VEGA_PACKAGES); do name=$${pkg%@*}; version=$${pkg#*@}; \
	    tar -xzf $$tmp/$$name-$$version.tgz -C $$tmp && \
	    printf '<!-- %s %s: build/%s.min.js of the npm package, unmodified. Its licence:\n' \
	      $$name $$version $$name && cat $$tmp/package/LICENSE && printf -- '-->\n<script>\n' && \
	    cat $$tmp/package/build/$$name.min.js && printf '\n</script>\n' && rm -rf $$tmp/package; \
	  done; \
	  printf '<style>\ntable { border-spacing: 15px; }\n</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n'; \
	} > .dvc/plots/offline.html.tmp && mv .dvc/plots/offline.html.tmp .dvc/plots/offline.html; \
	status=$$?; rm -rf $$tmp; exit $$status

clean:
	rm -rf artifacts reports/plots reports/train mlflow.db mlruns mlartifacts dvc_plots
