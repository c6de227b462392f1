# Fresh machine: `make demo` (main job) and `make test` (test suite) install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install data browser test test-fast lint bench demo ship

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (needs root; otherwise prints the command).
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST found in /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; \
	fi

# Debian's Chromium for the report's browser test (Playwright drives it; no browser download).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)); \
	else \
		echo "Chromium is missing: run 'sudo apt-get install chromium'"; exit 1; \
	fi

# Every test (CI runs this); test-fast skips the ones marked slow, browser or ddp (see tests/conftest.py).
test: install browser
	$(PY) -m pytest --all

test-fast: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/throughput.py

demo: install data
	$(VENV)/bin/bcosvit train --recipe fmnist-demo --out runs/demo

# Copy the trained Fashion-MNIST pair into the package: the last stage of each model's recipe,
# `bcosvit train --recipe fmnist-<model> --out runs/fmnist-<model>` (docs/results.md).
# STAGE picks another stage of the same runs, e.g. `make ship STAGE=cycle1`.
SHIPPED ?= bcos_vitc_micro_28 vitc_micro_28
STAGE ?= cycle4
ship: install
	for name in $(SHIPPED); do $(PY) -c "from bcosvit.weights import ship_weights; print(ship_weights('runs/fmnist-$$name/$(STAGE)'))"; done
