# Two entry points for a fresh machine (README.md): `make bench` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project's machines carry on local disk.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: bench test sensitivity qvlm setup crosscheck clean

# Stop before pip when the disk cannot hold the venv: pip's own "No space left on device"
# comes halfway through an install. $(1) is the venv's size in GB (torch 2.14.1 is a CUDA build).
define need_disk
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(1) ]; then \
		echo "make: $$free GB free under $(CURDIR); this venv needs about $(1) GB. Free some disk and re-run." >&2; \
		exit 1; \
	fi
endef

# --no-compile: byte-compiling all of torch and transformers cost over a minute of the 5-minute
# bench budget; Python compiles only what it imports, on first use.
$(VENV)/.installed: pyproject.toml
	$(call need_disk,7)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile $(TORCH)
	$(PY) -m pip install -q --no-compile -e ".[dev,export]"
	touch $@

setup: $(VENV)/.installed

bench: setup
	$(PY) -m pytest -m w4

test: setup
	$(PY) -m pytest tests
	$(PY) -m pytest -m "w4 and rtn" --limit 200 --report-dir reports-out/smoke

sensitivity: setup
	$(PY) -m pytest --grid benchmarks/grids/sensitivity.yaml

# The Q-VLM tables from this tree: both Q-VLM grids, then benchmarks/results/qvlm.md and CSVs.
qvlm: setup
	PY=$(PY) bash benchmarks/results/qvlm.sh

# Our GPTQ/AWQ against llm-compressor (benchmarks/crosscheck/README.md). llm-compressor pins an
# older torch and transformers than the suite, so it gets a venv of its own. torchvision goes:
# PyPI's build expects CUDA torch and transformers would import it.
CROSSCHECK_VENV := .venv-crosscheck
$(CROSSCHECK_VENV)/.installed: pyproject.toml
	$(call need_disk,3)
	$(PYTHON) -m venv $(CROSSCHECK_VENV)
	$(CROSSCHECK_VENV)/bin/python -m pip install -q --upgrade pip
	$(CROSSCHECK_VENV)/bin/python -m pip install -q --no-compile -e . "torch==2.13.0" "llmcompressor==0.14.0.1"
	$(CROSSCHECK_VENV)/bin/python -m pip uninstall -q -y torchvision
	touch $@

crosscheck: $(CROSSCHECK_VENV)/.installed
	$(CROSSCHECK_VENV)/bin/python -c "import llmcompressor"   # fail here, not as a quiet skip
	$(CROSSCHECK_VENV)/bin/python -m pytest tests/test_crosscheck_llmcompressor.py -p no:cacheprovider

clean:
	rm -rf reports-out .cache
