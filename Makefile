# `make demo` and `make test` do all the set-up: a virtual environment in .venv, torch 2.13.0 (a CPU build
# where one is at hand), the package and its test tools. Rerunning reinstalls only when pyproject.toml changes.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
DATA ?= $(if $(DARKKNOWLEDGE_DATA),$(DARKKNOWLEDGE_DATA),../shared/data)

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a plain 'torch' requirement would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/darkknowledge demo

test: install
	DARKKNOWLEDGE_DATA=$(DATA) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs/demo
