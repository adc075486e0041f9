# bibo-export: every user-facing command. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
VENV_XLA ?= .venv-xla
# On a TPU VM: `make setup TORCH_XLA_EXTRA=tpu` installs torch_xla[tpu] (libtpu) instead.
TORCH_XLA_EXTRA ?=
# torch_xla's backend for tests and the XLA CPU fallback; a TPU VM sets PJRT_DEVICE=TPU.
PJRT_DEVICE ?= CPU
PYTEST_ARGS ?=
# Tests run file by file on this many pytest-xdist workers: much of their time is one thread busy
# (ExecuTorch lowering is minutes of Python), so two files at once use both cores.
TEST_WORKERS ?= 2
# The XLA tests share the workers only on XLA's CPU backend: one process at a time holds a TPU.
XLA_TEST_WORKERS ?= $(if $(filter CPU,$(PJRT_DEVICE)),$(TEST_WORKERS),0)
# make train-tpu: chosen so that on 2 CPU cores through XLA's CPU backend it ends in < 15 min
# with a sort-tiny that sorts its trained length; on a TPU raise STEPS/BATCH, set MESH.
PRESET ?= sort-tiny
STEPS ?= 800
BATCH ?= 32
DATA ?= sort:6
MESH ?=
RUN ?= runs/$(PRESET)
TRAIN_ARGS ?=
# make bench-train: steps per row (the first two, compiling, are not timed).
BENCH_STEPS ?= 5
CUDA_BENCH_STEPS ?= 12
SCALE_MAX_LENGTH ?= 256
# make demo: its own model and schedule, picked by the sweep in docs/training.md to learn the
# most within the demo's time on 2 CPU cores, into its own run folder.
DEMO_PRESET ?= sort-demo
DEMO_STEPS ?= 700
DEMO_BATCH ?= 256
DEMO_LR ?= 3e-3
DEMO_PRECISIONS ?= fp32 int8 int4
DEMO_RUN ?= runs/demo
# make demo-text: a tokenizer and a small language model trained on the Python standard library's
# own top-level modules (every machine with Python has them: ~4.7 MB of code and docstrings),
# through XLA, exported int8 to ExecuTorch and ONNX, compared, and asked to continue TEXT_PROMPT.
STDLIB := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
TEXT_CORPUS ?= $(STDLIB)/*.py
TEXT_VOCAB ?= 2048
TEXT_STEPS ?= 500
TEXT_BATCH ?= 16
TEXT_SEQUENCE ?= 128
TEXT_LR ?= 3e-3
TEXT_PRECISIONS ?= int8 int4
TEXT_RUN ?= runs/demo-text
TEXT_ARTIFACTS ?= artifacts-text
TEXT_PROMPT ?= def __init__(self
TEXT_NEW_TOKENS ?= 48
# Exports that run at once in make demo and make export-executorch (one per core).
EXPORT_JOBS ?= 2
# make export-*, parity: the precisions exported and compared, each into ARTIFACTS/RUNTIME/P
# (fp32 bf16 int8 int4; bf16 is ExecuTorch's only, export-onnx leaves it out).
PRECISIONS ?= fp32 int8
comma := ,
precision_list = $(subst $() ,$(comma),$(strip $(1)))
EXECUTORCH_EXPORTS := $(addprefix export-executorch-,fp32 bf16 int8 int4)
# How many of our processes run side by side: each takes cores / BIBO_JOBS compute threads
# (bibo_export/threads.py), so that parallel lanes do not preempt each other's threads.
export BIBO_JOBS
# make export-* and parity: the checkpoint. By default the most recently trained run's final/
# under runs/ (after make demo: runs/demo/final), and with none, make train-tpu's, trained first.
LAST_TRAINED := $(shell ls -dt runs/*/final 2> /dev/null | head -1)
CKPT ?= $(or $(LAST_TRAINED),$(RUN)/final)
ARTIFACTS ?= artifacts
# One line naming the checkpoint, and why it is the one when nobody chose it.
SAY_CKPT = @echo "== checkpoint $(CKPT)$(if $(filter file,$(origin CKPT)),$(if $(LAST_TRAINED), \
	(the last trained run), (make train-tpu's)): CKPT=DIR picks another)"

# BiBo's ExecuTorch kernel library (experts, attention over the cache) and the C++ runner
# (runner/), built against .venv's ExecuTorch.
KERNELS := bibo_export/kernels/lib/libbibo_kernels.so
RUNNER := bibo_export/kernels/lib/bibo_runner
KERNEL_SOURCES := $(wildcard bibo_export/kernels/csrc/* runner/*)
CMAKE ?= cmake
# make setup-aarch64: the same two, cross-built for 64-bit Arm against the aarch64 wheel of the
# pinned ExecuTorch (downloaded by pip into build/aarch64), run here under qemu-user.
EXECUTORCH_VERSION := $(shell sed -n 's/^executorch==//p' requirements/export.txt)
AARCH64 := build/aarch64
AARCH64_EXECUTORCH := $(AARCH64)/wheel-$(EXECUTORCH_VERSION)/executorch
AARCH64_RUNNER := $(AARCH64)/bin/bibo_runner
AARCH64_TOOLS := aarch64-linux-gnu-g++:g++-aarch64-linux-gnu qemu-aarch64:qemu-user
XLA_PACKAGE := torch_xla$(if $(TORCH_XLA_EXTRA),[$(TORCH_XLA_EXTRA)])==2.9.0
STAMP := $(VENV)/.stamp
XLA_STAMP := $(VENV_XLA)/.stamp$(if $(TORCH_XLA_EXTRA),-$(TORCH_XLA_EXTRA))
# This machine's pip config prints many harmless "Location ... is ignored" warnings: drop only
# those lines; every other line, and pip's exit status, still reach the user.
QUIET_PIP := { grep -v "^WARNING: Location '.*' is ignored" || true; }

.PHONY: help demo demo-text setup setup-export setup-xla test test-export test-xla train-tpu \
	export-onnx export-executorch $(EXECUTORCH_EXPORTS) \
	parity bench bench-publish demo-publish bench-sharing bench-train bench-dispatch bench-onnx bench-executorch bench-scale clean distclean \
	check-kernel-tools setup-aarch64 check-aarch64-tools

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

demo: setup ## the whole pipeline: train → ONNX + ExecuTorch fp32/int8/int4 → parity → artifacts/report/report.md
	@mkdir -p build && date +%s.%N > build/demo-started
	@echo "== make demo: $$($(VENV_XLA)/bin/bibo-export device)"
	$(MAKE) --no-print-directory train-tpu PRESET=$(DEMO_PRESET) RUN=$(DEMO_RUN) STEPS=$(DEMO_STEPS) \
		BATCH=$(DEMO_BATCH) TRAIN_ARGS="--lr $(DEMO_LR) $(TRAIN_ARGS)"
	@date +%s.%N > build/demo-trained
	@# The exporters are mostly single-threaded Python, ExecuTorch's lowering most of all: the
	@# integer programs start first, fp32 and then ONNX (all precisions, one trace) follow.
	$(MAKE) --no-print-directory -j$(EXPORT_JOBS) BIBO_JOBS=$(EXPORT_JOBS) \
		$(addprefix export-executorch-,$(DEMO_PRECISIONS)) export-onnx \
		CKPT=$(DEMO_RUN)/final PRECISIONS="$(DEMO_PRECISIONS)"
	$(MAKE) --no-print-directory parity CKPT=$(DEMO_RUN)/final PRECISIONS="$(DEMO_PRECISIONS)"
	@$(VENV)/bin/python -m bench.publish record-demo --started "$$(cat build/demo-started)" \
		--trained "$$(cat build/demo-trained)" --report $(ARTIFACTS)/report --out $(ARTIFACTS)/demo.json \
		--training-python $(VENV_XLA)/bin/python

demo-publish: $(STAMP) ## publish make demo's record as a snapshot in docs/benchmarks/, regenerate README's results
	$(VENV)/bin/python -m bench.publish demo $(ARTIFACTS)/demo.json

demo-text: setup ## text in, text out: tokenizer + language model (XLA) → ExecuTorch/ONNX int8/int4 → parity → continuations
	$(VENV_XLA)/bin/bibo-export tokenizer train --data 'text:$(TEXT_CORPUS)' \
		--vocab-size $(TEXT_VOCAB) --out $(TEXT_RUN)-tokenizer
	$(MAKE) --no-print-directory train-tpu PRESET=text-tiny RUN=$(TEXT_RUN) STEPS=$(TEXT_STEPS) \
		BATCH=$(TEXT_BATCH) DATA='text:$(TEXT_CORPUS)' TRAIN_ARGS="--tokenizer \
		$(TEXT_RUN)-tokenizer/tokenizer.json --sequence-length $(TEXT_SEQUENCE) --lr $(TEXT_LR) \
		$(TRAIN_ARGS)"
	$(MAKE) --no-print-directory -j$(EXPORT_JOBS) BIBO_JOBS=$(EXPORT_JOBS) \
		$(addprefix export-executorch-,$(TEXT_PRECISIONS)) export-onnx \
		CKPT=$(TEXT_RUN)/final ARTIFACTS=$(TEXT_ARTIFACTS) PRECISIONS="$(TEXT_PRECISIONS)"
	$(VENV)/bin/bibo-export parity --checkpoint $(TEXT_RUN)/final \
		$(foreach p,$(TEXT_PRECISIONS),$(TEXT_ARTIFACTS)/executorch/$(p) $(TEXT_ARTIFACTS)/onnx/$(p)) \
		--report $(TEXT_ARTIFACTS)/report
	@echo "== the same prompt continued by each runtime (greedy, $(TEXT_NEW_TOKENS) tokens at most)"
	@for model in "$(TEXT_RUN)/final" $(foreach p,$(TEXT_PRECISIONS),"$(TEXT_ARTIFACTS)/onnx/$(p)" \
		"$(TEXT_ARTIFACTS)/executorch/$(p)" "$(TEXT_ARTIFACTS)/executorch/$(p) --llm-runner"); do \
		$(VENV)/bin/bibo-export generate --model $$model --prompt '$(TEXT_PROMPT)' \
			--max-new-tokens $(TEXT_NEW_TOKENS) || exit 1; done

setup: setup-export setup-xla ## create both virtual environments (idempotent)

setup-export: $(STAMP) $(KERNELS) $(RUNNER) ## the export/test env .venv (torch 2.13, executorch, onnx) + kernel library and C++ runner

setup-xla: $(XLA_STAMP) ## the XLA env .venv-xla (torch 2.9, torch_xla 2.9)

# A stamp is newer than its requirement file only after a complete install, so editing the
# pins (or an interrupted install) rebuilds the environment from scratch.
$(STAMP): requirements/export.txt pyproject.toml
	@echo "== creating $(VENV) from requirements/export.txt"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements/export.txt 2>&1 | $(QUIET_PIP)
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	touch $@

# The compiled kernels and runner (docs/export.md "The kernel library"): cmake and a C++ compiler.
$(KERNELS) $(RUNNER) &: $(STAMP) $(KERNEL_SOURCES) | check-kernel-tools
	@echo "== building $(KERNELS) and $(RUNNER) against .venv's ExecuTorch (log: build/kernels.log)"
	@mkdir -p build
	@{ $(CMAKE) -S runner -B build/native -DCMAKE_CXX_COMPILER="$$(command -v $(CXX))" \
		-Dexecutorch_DIR="$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/executorch/share/cmake" \
		-DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$(CURDIR)/$(dir $(KERNELS))" \
		-DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$(CURDIR)/$(dir $(RUNNER))" \
		&& $(CMAKE) --build build/native -j2; } > build/kernels.log 2>&1 \
		|| { tail -20 build/kernels.log; echo "error: building $(KERNELS) failed (full log: build/kernels.log)" >&2; exit 1; }

setup-aarch64: $(AARCH64_RUNNER) ## cross-build the kernel library and runner for aarch64 (installs Debian's cross compiler and qemu-user if missing)

# ExecuTorch's aarch64 wheel: its C++ runtime, headers and CMake package (not its Python).
$(AARCH64_EXECUTORCH)/share/cmake/executorch-config.cmake: requirements/export.txt | $(STAMP)
	@echo "== downloading ExecuTorch $(EXECUTORCH_VERSION)'s aarch64 wheel into $(AARCH64)/wheels"
	$(VENV)/bin/pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
		--platform manylinux_2_28_aarch64 --python-version 3.11 \
		executorch==$(EXECUTORCH_VERSION) -d $(AARCH64)/wheels 2>&1 | $(QUIET_PIP)
	rm -rf $(dir $(AARCH64_EXECUTORCH)) && $(VENV)/bin/python -m zipfile -e \
		$(AARCH64)/wheels/executorch-$(EXECUTORCH_VERSION)-*aarch64.whl $(dir $(AARCH64_EXECUTORCH))

$(AARCH64_RUNNER): $(AARCH64_EXECUTORCH)/share/cmake/executorch-config.cmake $(KERNEL_SOURCES) | check-aarch64-tools check-kernel-tools
	@echo "== cross-building $(AARCH64)/bin/{bibo_runner,libbibo_kernels.so} for aarch64 (log: $(AARCH64)/build.log)"
	@{ $(CMAKE) -S runner -B $(AARCH64)/build \
		-DCMAKE_TOOLCHAIN_FILE=$(CURDIR)/bibo_export/kernels/csrc/aarch64-linux-gnu.cmake \
		-DBIBO_MARCH=armv8-a -Dexecutorch_DIR=$(CURDIR)/$(AARCH64_EXECUTORCH)/share/cmake \
		-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$(CURDIR)/$(AARCH64)/bin \
		-DCMAKE_RUNTIME_OUTPUT_DIRECTORY=$(CURDIR)/$(AARCH64)/bin \
		&& $(CMAKE) --build $(AARCH64)/build -j2; } > $(AARCH64)/build.log 2>&1 \
		|| { tail -20 $(AARCH64)/build.log; echo "error: cross-building for aarch64 failed (full log: $(AARCH64)/build.log)" >&2; exit 1; }

# Debian's packages, installed where they are missing (as root, as CI runs; else say how).
check-aarch64-tools:
	@for tool in $(AARCH64_TOOLS); do command -v $${tool%%:*} > /dev/null || missing="$$missing $${tool#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
			echo "== installing$$missing (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing > /dev/null; \
		else echo "error: the aarch64 build needs$$missing: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

check-kernel-tools:
	@command -v $(CMAKE) > /dev/null || { echo "error: $(CMAKE) not found: it builds BiBo's ExecuTorch kernel library (install cmake >= 3.19)" >&2; exit 1; }
	@command -v $(CXX) > /dev/null || { echo "error: C++ compiler $(CXX) not found: it builds BiBo's ExecuTorch kernel library (install g++, or set CXX=...)" >&2; exit 1; }

$(XLA_STAMP): requirements/xla.txt pyproject.toml
	@echo "== creating $(VENV_XLA) from requirements/xla.txt (torch 2.9 is a ~7 GB CUDA build: minutes)"
	rm -rf $(VENV_XLA)
	$(PYTHON) -m venv $(VENV_XLA)
	$(VENV_XLA)/bin/pip install --disable-pip-version-check -q -r requirements/xla.txt "$(XLA_PACKAGE)" 2>&1 | $(QUIET_PIP)
	$(VENV_XLA)/bin/pip install --disable-pip-version-check -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	touch $@

test: test-export test-xla ## run the whole suite in both environments

# An aarch64 build made before (make setup-aarch64) is brought up to date for its tests.
test-export: $(STAMP) $(KERNELS) $(RUNNER) $(wildcard $(AARCH64_RUNNER)) ## tests in the export env (model, export, runtimes)
	$(VENV)/bin/python -m pytest -m "not xla" -n $(TEST_WORKERS) --dist loadfile --durations=10 \
		$(PYTEST_ARGS)

test-xla: $(XLA_STAMP) ## tests in the XLA env (model under torch 2.9, XLA compilation)
	PJRT_DEVICE=$(PJRT_DEVICE) $(VENV_XLA)/bin/python -m pytest -m "not export" -n $(XLA_TEST_WORKERS) \
		--dist loadfile --durations=10 \
		$(PYTEST_ARGS)

train-tpu: $(XLA_STAMP) ## train in .venv-xla on the best device (TPU through XLA, CUDA, else XLA CPU) → runs/PRESET/final
	$(VENV_XLA)/bin/bibo-export train --preset $(PRESET) --steps $(STEPS) --batch-size $(BATCH) \
		--data '$(DATA)' --out $(RUN) $(if $(MESH),--mesh $(MESH)) \
		$(if $(wildcard $(RUN)/checkpoints/step-*),--resume) $(TRAIN_ARGS)

# The default checkpoint is built on demand; an explicit CKPT must already exist.
$(RUN)/final/config.json:
	$(MAKE) train-tpu

DEFAULT_CKPT := $(if $(filter $(RUN)/final,$(CKPT)),$(RUN)/final/config.json)

export-onnx: $(STAMP) $(DEFAULT_CKPT) ## CKPT → artifacts/onnx/PRECISION for each of PRECISIONS (one trace), verified against eager
	$(SAY_CKPT)
	$(VENV)/bin/bibo-export export onnx --checkpoint $(CKPT) \
		--precision $(call precision_list,$(filter-out bf16,$(PRECISIONS))) --out $(ARTIFACTS)/onnx

export-executorch: ## CKPT → artifacts/executorch/PRECISION/model.pte for each of PRECISIONS, verified
	@# Lowering is minutes of single-threaded Python per program: build them side by side.
	$(MAKE) --no-print-directory -j$(EXPORT_JOBS) BIBO_JOBS=$(EXPORT_JOBS) \
		$(addprefix export-executorch-,$(PRECISIONS))

# One program each: make export-executorch-int4, …
$(EXECUTORCH_EXPORTS): export-executorch-%: $(STAMP) $(KERNELS) $(DEFAULT_CKPT)
	$(SAY_CKPT)
	$(VENV)/bin/bibo-export export executorch --checkpoint $(CKPT) --precision $* \
		--out $(ARTIFACTS)/executorch

# make parity compares the exports of PRECISIONS that exist.
EXPORTED = $(wildcard $(foreach p,$(PRECISIONS),$(ARTIFACTS)/onnx/$(p) $(ARTIFACTS)/executorch/$(p)))

parity: $(STAMP) $(KERNELS) ## every export vs eager on CKPT (docs/parity.md bars) → artifacts/report/report.{md,json}, plots
	$(if $(EXPORTED),,$(error no exports under $(ARTIFACTS)/: run make export-onnx and/or make export-executorch first))
	$(SAY_CKPT)
	$(VENV)/bin/bibo-export parity --checkpoint $(CKPT) $(EXPORTED) --report $(ARTIFACTS)/report

bench-publish: $(STAMP) ## publish bench/results as a snapshot in docs/benchmarks/, regenerate README's results
	$(VENV)/bin/python -m bench.publish bench

bench: $(STAMP) $(XLA_STAMP) ## every benchmark, fresh → bench/results/*.json + summary.md
	@# Start empty so that the summary holds this run only: its ratios compare rows of one run.
	rm -rf bench/results
	$(MAKE) --no-print-directory bench-dispatch bench-train bench-onnx bench-executorch bench-sharing
	$(VENV)/bin/python -m bench.summary

bench-onnx: $(STAMP) ## ONNX Runtime fp32/int8/int4 vs eager: prefill, decode, bytes → bench/results/onnx.json
	$(VENV)/bin/python -m bench.onnx

bench-executorch: $(STAMP) $(KERNELS) $(RUNNER) ## ExecuTorch fp32/int8/int4 vs eager → bench/results/executorch.json
	$(VENV)/bin/python -m bench.executorch

bench-train: $(STAMP) $(XLA_STAMP) ## train-step tokens/s, static vs dynamic dispatch → bench/results/train.json
	$(VENV)/bin/python -m bench.train --backend eager --steps $(BENCH_STEPS) --dispatches loop index grouped
	@# On XLA every loop step recompiles (200–290 s each on 2 cores), so the loop baseline gets
	@# the minimum 3 steps, and only for sort-tiny: at the bench preset its recompiles
	@# exhaust LLVM's memory and abort the process.
	PJRT_DEVICE=$(PJRT_DEVICE) $(VENV_XLA)/bin/python -m bench.train --backend xla \
		--presets sort-tiny --steps $(BENCH_STEPS) --loop-steps 3
	PJRT_DEVICE=$(PJRT_DEVICE) $(VENV_XLA)/bin/python -m bench.train --backend xla \
		--presets bench --steps $(BENCH_STEPS) --dispatches index
	@# Where the export env's torch sees a GPU: bench and reference on CUDA, each shape in its
	@# own process (a second shape in one process would recompile with dynamic shapes).
	@if $(VENV)/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		for shape in "bench 16x512" "reference 4x1024" "reference 8x2048"; do set -- $$shape; \
			$(VENV)/bin/python -m bench.train --backend cuda --presets $$1 --shapes $$2 \
				--steps $(CUDA_BENCH_STEPS) --dispatches index grouped \
				--compile-modes default reduce-overhead step-graph || exit 1; done; \
	else echo "bench-train: no CUDA device, CUDA rows skipped"; fi

bench-scale: $(STAMP) $(KERNELS) ## reference preset (752.6M) exports: time, peak memory, sizes → bench/results/scale.json
	@# Not part of make bench: about 15 minutes, 3 GB of checkpoint and 10 GB of artifacts
	@# under bench/work/scale, and up to 12 GB of memory per export.
	$(VENV)/bin/python -m bench.scale --max-length $(SCALE_MAX_LENGTH)
	$(VENV)/bin/python -m bench.summary

bench-sharing: $(STAMP) ## eager decode alone and beside other processes, default threads vs BIBO_JOBS's share → bench/results/sharing.json
	$(VENV)/bin/python -m bench.sharing

bench-dispatch: $(STAMP) $(XLA_STAMP) ## MoE dispatch benchmark → bench/results/dispatch.json
	$(VENV)/bin/python -m bench.dispatch --backend eager
	PJRT_DEVICE=$(PJRT_DEVICE) $(VENV_XLA)/bin/python -m bench.dispatch --backend xla

clean: ## remove run outputs, artifacts and benchmark results (keeps the environments)
	rm -rf runs artifacts artifacts-text bench/results bench/work .pytest_cache

distclean: clean ## also remove both virtual environments
	rm -rf $(VENV) $(VENV_XLA) build $(dir $(KERNELS))
