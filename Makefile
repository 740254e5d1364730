# `make demo` and `make test` do all the set-up: a virtual environment in .venv, torch 2.13.0 (a CPU build
# where one is at hand), the package and its test tools. Rerunning reinstalls only when pyproject.toml changes.
# `make docs` builds the documentation site into site/ (the docs extra: MkDocs, mkdocs-material, mkdocstrings).
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
DATA ?= $(if $(DARKKNOWLEDGE_DATA),$(DARKKNOWLEDGE_DATA),../shared/data)

.PHONY: demo test docs install clean

install: $(VENV)/.installed

# pip's own progress is shown: the first install downloads torch (~200 MB) and takes a minute or more.
$(VENV)/.installed: pyproject.toml
	@echo "== setting up $(VENV): a virtual environment, torch 2.13.0, then darkknowledge with its test tools"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a plain 'torch' requirement would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install --progress-bar on torch==2.13.0
	$(BIN)/python -m pip install --progress-bar on -e '.[test]'
	touch $@

demo: install
	@echo "== darkknowledge demo: teacher, small net and distilled student on the embedded digits"
	$(BIN)/darkknowledge demo

test: install
	DARKKNOWLEDGE_DATA=$(DATA) $(BIN)/python -m pytest -q

$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --progress-bar on -e '.[docs]'
	touch $@

# --strict: a broken link, a missing page, a failing results expression or a missing API reference fails the build
docs: $(VENV)/.docs-installed
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs/demo site
