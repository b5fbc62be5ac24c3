# One-command set-up for a fresh clone. `make train` installs and runs the main job on the
# embedded sample; `make test` installs and runs the whole test suite (CI); `make test-fast` runs
# it without the tests marked `slow` (the edit loop). All create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Two ranks by default (CPU ranks on a machine without GPUs, one per GPU otherwise).
RANKS ?= 2
MODEL ?= esen
WIDTH ?= 64

.PHONY: setup install-venv train test test-fast clean bench-fairchem bench-fairchem-gpu fairchem-env
setup: $(VENV)/.installed

# `make train` and `make test` started together on a fresh clone would both build .venv: the
# install holds a lock, and the second waits for it, then finds .venv ready
$(VENV)/.installed: pyproject.toml
	flock $(VENV).lock $(MAKE) --no-print-directory install-venv

install-venv:
	@if [ -f $(VENV)/.installed ] && [ $(VENV)/.installed -nt pyproject.toml ]; then exit 0; fi; \
	set -e; \
	$(PYTHON) -m venv $(VENV); \
	$(BIN)/pip install --upgrade pip setuptools wheel; \
	$(BIN)/pip install -e ".[test]"; \
	touch $(VENV)/.installed

train: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/deepspeed --log_level warning --num_gpus $(RANKS) launcher/train.py --model $(MODEL) --width $(WIDTH)

# tests and the docstring examples of the four rooms (pyproject.toml: testpaths, --doctest-modules)
# Both end with the tests that took longest in wall time and in CPU time (tests/cputime.py: a busy
# machine stretches the first, hardly the second); PYTEST_ARGS=... adds options.
# The suite runs on PYTEST_WORKERS pytest-xdist workers (default 2: one pytest process cannot use
# more than one core, and serially the suite took ~17 min beside `make train`), a test file to one
# worker (its module fixtures are built once, session fixtures once per worker); PYTEST_WORKERS=0
# runs it serially in one process.
PYTEST_REPORT ?= --durations=30 --cpu-durations=30
PYTEST_WORKERS ?= 2
PYTEST_DIST := -n $(PYTEST_WORKERS) --dist loadfile
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest $(PYTEST_DIST) $(PYTEST_REPORT) $(PYTEST_ARGS)

test-fast: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest $(PYTEST_DIST) -m "not slow" $(PYTEST_REPORT) $(PYTEST_ARGS)

# fairchem (the reference eSEN, eSCN-MD) in its own virtual environment beside the project's: it pins
# its own torch. Git-ignored; `make clean` leaves it (a slow install).
FAIRCHEM_VENV ?= .venv-fairchem
FAIRCHEM_VERSION ?= 2.24.*
fairchem-env: $(FAIRCHEM_VENV)/.installed

$(FAIRCHEM_VENV)/.installed:
	$(PYTHON) -m venv $(FAIRCHEM_VENV)
	$(FAIRCHEM_VENV)/bin/pip install --upgrade pip
	$(FAIRCHEM_VENV)/bin/pip install "fairchem-core==$(FAIRCHEM_VERSION)"
	touch $@

# symscale's eSEN against fairchem's eSCN-MD, interleaved in one process pair (CPU, fp32, 1 thread)
bench-fairchem: setup fairchem-env
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_vs_fairchem.py --fairchem-python $(FAIRCHEM_VENV)/bin/python

# the same on a CUDA device: larger batches, fp32 and bf16
bench-fairchem-gpu: setup fairchem-env
	$(BIN)/python benchmarks/bench_vs_fairchem.py --fairchem-python $(FAIRCHEM_VENV)/bin/python --device cuda

clean:
	rm -rf $(VENV) runs .cache
