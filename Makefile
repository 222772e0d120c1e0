# The two commands: `make demo` and `make test`. Both create .venv with the system python if it is
# missing and install the package (editable) with its dev and export extras.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test test-unit bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e '.[dev,export]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/bayprano demo $(DEMO_ARGS)

# ruff (pyflakes, syntax and the format) and mypy (the type check over bayprano/, configured in
# pyproject.toml) check the code first; pytest exits 5 when it collected no test: that is a failure.
test: install
	$(VENV)/bin/ruff check bayprano tests benchmarks
	$(VENV)/bin/ruff format --check bayprano tests benchmarks
	$(VENV)/bin/mypy
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The unit tests alone (no Ray), in about a minute: a quick check while editing. `make test` runs everything.
test-unit: install
	@$(VENV)/bin/python -m pytest -m unit $(PYTEST_ARGS)

# Benchmarks (not tests): each prints a Markdown table and writes JSON to benchmarks/results/.
DATA_TIMING_ARGS ?=
SPEED_ARGS ?=
bench: install
	$(VENV)/bin/python benchmarks/data_timing.py $(DATA_TIMING_ARGS)
	$(VENV)/bin/python benchmarks/speed.py $(SPEED_ARGS)

clean:
	rm -rf demo-output .pytest_cache .mypy_cache
