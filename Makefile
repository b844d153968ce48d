# Two entry points: `make demo` and `make test`. Both create .venv on first use and install the locked environment:
# requirements/*.txt pin every package to one version and its SHA-256 (README, "Reproducing the numbers").
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
REQ    := requirements
PIP    := $(BIN)/pip install -q
# 1: install the lock files (hash-checked); 0: pyproject's version ranges, for a Python or platform the lock is not
# for (versions, and so numbers, may then differ from the README's)
LOCKED ?= 1
# torch goes on its own: by default the lock's CPU wheel, found through pip's configuration (or add
# TORCH_INDEX=https://download.pytorch.org/whl/cpu); on a CUDA machine: make install TORCH=torch==2.13.0
ifeq ($(LOCKED),1)
TORCH  ?= --no-deps --require-hashes -r $(REQ)/torch-cpu.txt
else
TORCH  ?= torch==2.13.0
endif
TORCH_INDEX ?=
# `make lock` keeps the versions installed in .venv (the environment the numbers came from); LOCK_ARGS= takes the
# newest versions pyproject's ranges allow
LOCK_ARGS ?= --pin-from-env

.PHONY: demo test install install-test lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(REQ)/lock-run.txt $(REQ)/torch-cpu.txt
ifeq ($(LOCKED),1)
	$(BIN)/python $(REQ)/lock.py check
	$(PIP) --require-hashes --no-deps -r $(REQ)/lock-run.txt
	$(PIP) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(TORCH) || { echo "torch: see TORCH, TORCH_INDEX in the Makefile" >&2; exit 1; }
	$(PIP) --no-deps -e .
	$(BIN)/pip check
else
	$(PIP) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(TORCH)
	$(PIP) -e .
endif
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(REQ)/lock-extras.txt
ifeq ($(LOCKED),1)
	$(PIP) --require-hashes --no-deps -r $(REQ)/lock-extras.txt
	$(BIN)/pip check
else
	$(PIP) -e ".[test,trackers,images,slurm,tune]"
endif
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/kdlab demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# rewrite requirements/*.txt from pyproject.toml through pip's resolver (commit them with the change that needed it)
lock: $(BIN)/python
	$(BIN)/python $(REQ)/lock.py generate $(LOCK_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
