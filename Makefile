# `make demo` sets up .venv (runtime requirements only) and generates a video with the bundled demo model.
# `make test` is the one command that sets up a fresh machine and runs the test suite (CI runs it);
# it installs libtpu too, so the TPU compiler checks the TPU code paths (deviceless, no TPU needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_PROMPT ?= a red circle moving left on a black background
DEMO_OUT ?= outputs/demo

.PHONY: install demo test test-fast lint format bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime requirements-test.txt requirements-lint.txt requirements-tpu.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt -r requirements-tpu.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.runtime
	$(PY) sample.py --prompt "$(DEMO_PROMPT)" --out $(DEMO_OUT)

# Test files are spread over TEST_WORKERS pytest-xdist processes (a file stays in one process, so its
# module fixtures are built once); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# lint needs only ruff, not the test stack: a venv with ruff alone is enough.
$(VENV)/.lint: requirements-lint.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-lint.txt
	touch $@

lint: $(VENV)/.lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.lint
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) benchmarks/bench_transformer.py

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
