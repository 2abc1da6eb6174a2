# Two commands set everything up on a fresh machine:  make demo  and  make test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv airflow airflow-stop db-start db-stop constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wattplan demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

airflow: $(STAMP)
	$(BIN)/wattplan airflow start

airflow-stop: $(STAMP)
	$(BIN)/wattplan airflow stop

db-start: $(STAMP)
	$(BIN)/wattplan db start

db-stop: $(STAMP)
	$(BIN)/wattplan db stop

constraints: $(STAMP)
	$(BIN)/pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf $(VENV) .wattplan .pytest_cache .mypy_cache .ruff_cache
