# Two entry points for a fresh machine (README.md): `make bench` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project's machines carry on local disk.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: bench test sensitivity setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

setup: $(VENV)/.installed

bench: setup
	$(PY) -m pytest -m w4

test: setup
	$(PY) -m pytest tests
	$(PY) -m pytest -m "w4 and rtn" --limit 200 --report-dir reports-out/smoke

sensitivity: setup
	$(PY) -m pytest --grid benchmarks/grids/sensitivity.yaml

clean:
	rm -rf reports-out .cache
