# Two commands do all the set-up on a fresh machine:
#   make demo   gateway + simulated replicas + a short load, then a report
#   make test   the test suite (installs redis-server if it can)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench simulate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dp-router demo

test: $(STAMP)
	scripts/ensure-redis.sh
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check router policies
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/dp-router bench

simulate: $(STAMP)
	$(BIN)/dp-router simulate --policy round_robin --policy least_request --policy queue_depth

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .mypy_cache
