# Quick start:  make up    (install, then run pgfleet on its embedded Postgres)
#               make test  (install, then run the test suite)
VENV ?= .venv

.PHONY: setup up test lint bench

setup:
	bash scripts/setup.sh

up: setup
	$(VENV)/bin/pgfleet up $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/python -m bench.pgbench_compare $(ARGS)
