# The two commands of the README. Each sets up what is missing (scripts/setup.sh), then runs.
VENV ?= .venv
CONFIG ?= configs/demo.yaml
ARGS ?=

.PHONY: setup demo test test-fast

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/rank1 run --config $(CONFIG) $(ARGS)

test:
	@bash scripts/setup.sh --browser
	$(VENV)/bin/python -m pytest tests $(ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest tests -m "not slow" $(ARGS)
