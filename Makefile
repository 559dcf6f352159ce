# The two commands of the README's quick start. Each creates ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint format clean stability

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/caat-peft demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) demo_output runs .pytest_cache .ruff_cache

# The tests that assert training outcomes, under ATEN_CPU_CAPABILITY default / avx2 / avx512,
# OMP_NUM_THREADS 1 / 2 and seeds 0-4 (about an hour on 2 cores; docs/reliability.md).
stability: $(BIN)/.installed
	$(BIN)/python tools/stability.py --out stability.json
