# The two entry points a newcomer needs: `make demo` and `make test`.
# Both create .venv and install the project (with test tools) from pyproject.toml first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-work

.PHONY: setup demo test test-fast lint postgres

setup: $(VENV)/.installed

# constraints.txt: the exact releases the suite and the README's figures were run with.
$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/lru-online demo --workdir $(DEMO_DIR)

# The tests marked `servers` start PostgreSQL from its binaries (Debian package, no service).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		{ SUDO=$$( [ "$$(id -u)" -ne 0 ] && echo sudo ); \
		  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql >/dev/null; }

# Two workers (the 2 cores CI has; `-n auto` would read a container's host cores and start a
# Prefect test server per worker), each taking whole test files (module fixtures run once) in
# the order collected, longest files first (tests/conftest.py); torch one thread per worker.
TEST_WORKERS ?= 2
test: setup postgres
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Everything but the tests marked slow (whole runs, killed subprocesses, the Triton
# interpreter, a million-row file) and servers: a few minutes, no services.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not servers"

lint: setup
	$(BIN)/ruff check .
