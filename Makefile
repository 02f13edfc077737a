# Single entry point. Every target sets up (or reuses) the project-local
# virtual environment first; see tools/setup/setup_env.sh.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers of `make test`, each taking whole test files with one
# OpenMP thread per core (0: one process, no workers). Two, for 2 cores: the suite
# is CPU-bound, so a worker per core is what pays (docs/notes/benchmarks.md#test-suite).
TEST_WORKERS ?= 2

.PHONY: setup test test-slow test-gpu demo clean-venv

setup:
	@bash tools/setup/setup_env.sh

# The test command of README.md and .ci/run: all but the tests marked `slow`
# (pytest.ini's addopts deselects them), in TEST_WORKERS processes.
test: setup
	$(PY) -m pytest tests projects benchmarks -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Only the tests marked `slow`: probe trainings, soaks, compiled variants.
test-slow: setup
	$(PY) -m pytest -m slow tests projects benchmarks $(PYTEST_ARGS)

# Only the tests marked `gpu`, all in this one process with the GPUs visible
# (no child pytest per test: each would import the whole stack again);
# skipped, with the reason, without enough GPUs.
test-gpu: setup
	CONVNEUR_TEST_GPU_CHILD=1 $(PY) -m pytest -m gpu tests projects benchmarks $(PYTEST_ARGS)

# The main job on the embedded default: tiny COCO / ADE20K / ImageNet sets.
demo: setup
	@bash tools/setup/run_demo.sh

clean-venv:
	rm -rf $(VENV)
