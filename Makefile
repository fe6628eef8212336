# Two commands do everything on a fresh machine:
#   make demo   set up, fetch the default model once, run the main job
#   make test   set up, fetch the default model once, run the test suite
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
# Override elsewhere, e.g. `make TORCH_SPEC="torch==2.5.1" test`.
TORCH_SPEC ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup fetch browser demo test test-fast lint typecheck hooks bench-cpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

fetch: setup
	$(BIN)/slimtune fetch

demo: fetch
	$(BIN)/slimtune demo

# the dashboard's tests drive Debian's Chromium headless (packages chromium, chromium-driver)
APT := $(shell [ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive apt-get -y -q
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  $(APT) install chromium chromium-driver >/dev/null || \
	  ($(APT) update >/dev/null && $(APT) install chromium chromium-driver >/dev/null)

# pytest-xdist workers, each taking whole files in collection order (tests/conftest.py
# puts the longest first and gives each worker its share of the cores); TEST_WORKERS=0
# runs in one process
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: fetch browser
	$(PYTEST) --durations=15

# the inner loop: everything but the tests on the real default model (CI runs `make test`)
test-fast: setup
	$(PYTEST) -m "not default_model"

# what CI checks before the tests: lint, formatting (ruff) and types (mypy)
lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(MAKE) --no-print-directory typecheck

# mypy on methods/ and delta/ ([tool.mypy] in pyproject.toml says what it checks)
typecheck: setup
	$(BIN)/python -m mypy

# the git pre-commit hook: ruff check, format check and mypy per commit (.pre-commit-config.yaml)
hooks: setup
	$(BIN)/pre-commit install

bench-cpu: fetch
	$(BIN)/python benchmarks/bench_methods.py --device cpu

clean:
	rm -rf $(VENV) runs .pytest_cache
