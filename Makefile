# Two commands for a fresh machine (README.md):
#   make demo   installs the project into .venv, runs `dvc repro` on the embedded default, prints the results table
#               and a one-line verdict on it
#   make test   installs the project with test extras into .venv, runs the test suite
# (make test-fast: the unit tests only, without the tests marked slow: subprocesses, torchrun, DVC)
# (make test-shapes: the memory plan against the stages at the ImageNet shapes, skipped by make test)
# (make paper: after the demo, the paper's other experiments, pipelines/paper)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo paper test test-fast test-shapes install lint clean

$(BIN)/cca-pipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/cca-pipe

# the last line: this run's CCA / best CFG against the range of the recorded runs (docs/paper.md, "What make demo prints")
demo: install
	@start=$$(date +%s); dvc repro && cca-pipe results data/report/results.md && \
	echo "dvc repro + results: $$(( $$(date +%s) - start )) s" && cca-pipe verdict

# The paper's other experiments (DPO, Unlearning, CCA+CFG, a lambda-conditioned policy) on the same cache
paper: demo
	@start=$$(date +%s); cd pipelines/paper && dvc repro && cca-pipe results ../../data/paper/report/results.md && \
	echo "pipelines/paper dvc repro + results: $$(( $$(date +%s) - start )) s"

# 2 pytest-xdist workers (the 2 cores; tests/conftest.py: which tests share a worker, the costliest first). The suite
# is CPU-bound (the cores idle ~1% of a run): a third worker was slower, 867 s against 803 s (docs/performance.md)
XDIST := -n 2 --dist loadscope --no-loadscope-reorder

test: install
	$(BIN)/python -m pytest -q $(XDIST)

test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

# the plan against the stages at the ImageNet shapes (stand-in checkpoints; 13 GB of RSS, ~20-35 min on 2 cores)
test-shapes: install
	$(BIN)/python -m pytest -q --real-shapes tests/test_plan.py -k imagenet_shapes

lint: install
	$(BIN)/ruff check pipeline stages tests bench

clean:
	rm -rf $(VENV)
