# The README's two commands. Each creates .venv if missing and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real data that ships in Debian packages (no downloads at run time): Fashion-MNIST for zero-shot
# classification, WordNet for MetaCLIP metadata, emoji-test.txt for emoji groups/subgroups.
DEBS := dataset-fashion-mnist wordnet-base unicode-data
DEB_FILES := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz /usr/share/wordnet/index.noun /usr/share/unicode/emoji/emoji-test.txt
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# CLIP's BPE vocabulary lies in the open_clip_torch wheel; its torchvision/timm dependencies do not
# import beside the CPU torch wheel, and we only read the vocabulary file, so install it alone.
OPEN_CLIP := open_clip_torch==3.3.0

.PHONY: demo test bench clean-data sysdeps

sysdeps:
	@for f in $(DEB_FILES); do [ -e $$f ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian data packages: $(DEBS)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(DEBS) >/dev/null; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(OPEN_CLIP)
	touch $(STAMP)

data/emoji/manifest.json: $(STAMP)
	$(BIN)/llip shards emoji --out data/emoji

data/eval/fashion_mnist/manifest.json: $(STAMP)
	$(BIN)/llip shards fashion-mnist --out data/eval/fashion_mnist

demo: sysdeps $(STAMP) data/emoji/manifest.json data/eval/fashion_mnist/manifest.json
	$(BIN)/llip run experiments/demo.yaml

test: sysdeps $(STAMP)
	$(BIN)/pytest -q --durations=25

bench: $(STAMP)
	$(BIN)/python benchmarks/llip_scoring.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/resume.py
	$(BIN)/python benchmarks/sweep_data.py

clean-data:
	rm -rf data/emoji data/eval

# The training-step benchmark on one GPU at B/16 in bf16: samples/s and MFU (peak from llip_core.flops's
# table). Needs a CUDA build of torch 2.13 in the venv; override the flags with GPU_BENCH_ARGS="...".
GPU_BENCH_ARGS ?= --device cuda --size B/16 --batch 256 --rounds 10 --peak-flops auto --only clip llip_k32 literal_k32
.PHONY: bench-gpu
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/train_step.py $(GPU_BENCH_ARGS)
