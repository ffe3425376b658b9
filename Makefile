# make train   the default job: gpt-tiny on the Python standard library (a few minutes on 2 cores)
# make test    the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first, so pip takes that exact release (a CPU build where one is at hand).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

train: $(VENV)/.installed
	$(BIN)/zhilu train

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q --durations=25

clean:
	rm -rf $(VENV) runs .pytest_cache
