# evomerge developer and user entry points. Every target installs what it needs by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ZOO := artifacts/zoo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo zoo lint clean

install: $(STAMP)

# constraints.txt pins torch==2.13.0 (a CPU wheel on this machine, the CUDA build elsewhere)
# and the versions tested together; pyproject.toml keeps the ranges open.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

zoo: install
	$(VENV)/bin/evomerge zoo --out $(ZOO)

demo: install
	$(PY) scripts/demo.py --zoo $(ZOO)

lint: install
	$(VENV)/bin/ruff check evomerge tests scripts evals
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) artifacts .pytest_cache
