# One-command set-up for a fresh clone. `make train` installs and runs the main job on the
# embedded sample; `make test` installs and runs the test suite. Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Two ranks by default (CPU ranks on a machine without GPUs, one per GPU otherwise).
RANKS ?= 2
MODEL ?= esen
WIDTH ?= 64

.PHONY: setup train test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -e ".[test]"
	touch $@

train: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/deepspeed --log_level warning --num_gpus $(RANKS) launcher/train.py --model $(MODEL) --width $(WIDTH)

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .cache
