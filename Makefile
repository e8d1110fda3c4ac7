# sun_seg: every target installs what it needs into .venv first (Python 3.11+, what the pinned numpy and scipy need).
#   make demo    the main job: the whole study on the generated demo dataset, then tables, figures, site
#   make test    the default test suite (what CI runs)
#   make lab     JupyterLab on nbs/ with this project's environment as the kernel (notebooks saved clean)
#   make kernel  the "Python (sun_seg)" kernel for a Jupyter of your own too (installed for your user)
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sun_seg-installed
export PYTHONUNBUFFERED := 1
export JUPYTER_PLATFORM_DIRS := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# the hub is forced offline only for the tests and the demo (which never need it); `make lab` may download a checkpoint
OFFLINE := HF_HUB_OFFLINE=1

.PHONY: help install demo test test-all lab kernel report site bench export clean

help:
	@grep -E '^#   make' Makefile | sed 's/^#   //'

$(STAMP): settings.ini setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "sun_seg needs Python 3.11 or newer (the pinned numpy and scipy do): make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name sun_seg --display-name "Python (sun_seg)" >/dev/null
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install sun_seg with its test tools

demo: $(STAMP)  ## the main job: the demo study end to end
	$(OFFLINE) $(BIN)/sun-seg study --demo

test: $(STAMP)  ## default tests: notebooks (one item each), library, end-to-end; slow ones excluded
	$(OFFLINE) $(BIN)/python -m pytest

test-all: $(STAMP)  ## every test: slow ones and notebook cells flagged `#| slow` too; CUDA ones run where a GPU is (else they skip)
	$(OFFLINE) SUN_SEG_TEST_SLOW=1 $(BIN)/python -m pytest -m "slow or not slow"

lab: $(STAMP)  ## JupyterLab on nbs/ with the project's kernel; a notebook is saved as nbdev_clean leaves it
	$(BIN)/jupyter lab --notebook-dir=nbs --ContentsManager.pre_save_hook=sun_seg.lab.clean_on_save

kernel: $(STAMP)  ## "Python (sun_seg)" for a Jupyter outside .venv too: the kernelspec installed for your user
	env -u JUPYTER_PLATFORM_DIRS $(BIN)/python -m ipykernel install --user --name sun_seg --display-name "Python (sun_seg)"

report: $(STAMP)  ## rebuild the demo study's tables, figures and site from its runs (no training)
	$(BIN)/sun-seg report --demo

bench: $(STAMP)  ## the performance benchmark (quick profile)
	$(BIN)/sun-seg bench --quick

export: $(STAMP)  ## developers: notebooks -> library, then clean notebooks; the packaged template and study file
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean
	cp nbs/train.ipynb reports/study.yaml sun_seg/templates/

clean:
	rm -rf $(VENV) _docs .pytest_cache
