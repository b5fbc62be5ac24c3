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

.PHONY: setup train test test-fast clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -e ".[test]"
	touch $@

train: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/deepspeed --log_level warning --num_gpus $(RANKS) launcher/train.py --model $(MODEL) --width $(WIDTH)

# tests and the docstring examples of the four rooms (pyproject.toml: testpaths, --doctest-modules)
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest

test-fast: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .cache
