# EditKit developer commands. The two that matter on a fresh machine:
#   make demo   - set up if needed, run the example workflows headless, write PNGs under out/
#   make test   - set up if needed, run the whole test suite
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1
export TORCH_THREADS ?= 1
# Test processes (pytest-xdist): one per core of the project's 2-core machines; TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast bench bench-quality toy-model workflows run clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) scripts/demo.py

test: setup
	@$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	@$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: setup
	@$(PY) bench/run.py $(BENCH_ARGS)

bench-quality: setup
	@$(PY) bench/quality.py $(BENCH_ARGS)

toy-model: setup
	@$(PY) scripts/train_toy.py $(TRAIN_ARGS)

workflows: setup
	@$(PY) scripts/build_workflows.py

run: setup
	@test -n "$(WF)" || { echo "usage: make run WF=workflows/x.json ARGS='--set 3.seed=5'"; exit 2; }
	@.venv/bin/editkit-run $(WF) $(ARGS)

clean:
	rm -rf out .pytest_cache
