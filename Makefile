# The README's two commands. Each creates .venv if missing and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-data

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

data/emoji/manifest.json: $(STAMP)
	$(BIN)/llip shards emoji --out data/emoji

demo: $(STAMP) data/emoji/manifest.json
	$(BIN)/llip run experiments/demo.yaml

test: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/llip_scoring.py
	$(BIN)/python benchmarks/ingest.py

clean-data:
	rm -rf data/emoji
