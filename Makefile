# The README's two commands: `make demo` and `make test`. Each sets up .venv first (once; again when the
# pinned requirements, setup.py or the C++ sources and headers change).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# test processes for make test: two keep a 2-core machine busy while one waits on a subprocess's start-up; each takes a
# whole file (--dist loadfile), so a file's shared runs (module fixtures) are made once, longest files first
# (LONGEST_FIRST in conftest.py; xdist would reorder them by test count). The benchmarks run in the same session, in
# quick mode (their figures are not kept), so neither suite waits for the other's last file
TEST_WORKERS ?= 2
TEST_PATHS ?= tests benchmarks
# ranks for the demo: every GPU when there are some, two CPU ranks (gloo) otherwise
NUM_GPUS ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c GPU); [ "$$n" -gt 0 ] && echo $$n || echo 2)

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(BIN)/deepspeed --num_gpus $(NUM_GPUS) fastclip/train.py $(ARGS)

test: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--quick --benchmark-disable $(TEST_PATHS) $(PYTEST_ARGS)

bench: setup  # the full CPU benchmark run (about 40 minutes); writes benchmarks/results/cpu-DATE.json
	$(BIN)/python -m pytest -q -p no:cacheprovider benchmarks
	$(BIN)/python benchmarks/report.py --update-docs

lint: setup  # what make test checks first; `$(BIN)/ruff format .` fixes the formatting
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .cache runs
