# make run   - set up the environment if needed, then serve the embedded default config
# make test  - set up the environment if needed, then run the test suite
# make bench - the framework-overhead benchmark (BENCHMARKS.md)
# make lock  - resolve pyproject.toml again into uv.lock and requirements/lock-{cpu,gpu}.txt
# Variables: VENV (default .venv), PROFILE (cpu | gpu), ARGS (Hydra overrides for run),
#            PYTEST_ARGS (extra pytest arguments).
VENV ?= .venv
PROFILE ?= cpu
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-all bench lock docs clean

setup:
	@VENV=$(VENV) PROFILE=$(PROFILE) bash scripts/setup_env.sh

run: setup
	$(PY) -m apps.launch $(ARGS)

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.overhead

lock:
	bash scripts/lock.sh

# docs/configuration.md from the schemas' field descriptions (tests/unit/test_docs.py checks it)
docs: setup
	$(PY) -m apps.config_reference

clean:
	rm -rf outputs multirun .pytest_cache
