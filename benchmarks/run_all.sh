#!/usr/bin/env bash
# Every benchmark the README and docs cite, one after another (they time side by side within a run; never run two
# at once), each table written to benchmarks/results/<name>.md; a cited run left out says why in one line.
# Overwrites the results files: notes on a run belong in benchmarks/README.md. Time on an idle 2-core CPU VM, summed
# from each script's own note (the whole was never timed): about 45 min for the bench_* scripts, 15 for compile,
# profile and the two examples, 15-30 for the quality quick runs when their data are built.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
run() {
    local name=$1; shift
    echo "== $name: python $*" >&2
    "$PY" "$@" > "benchmarks/results/$name.md"
}
mkdir -p benchmarks/results

# Speed and memory against PEFT and TRL (benchmarks/README.md, docs/performance.md).
run sft_tiny benchmarks/bench_sft.py --model tiny
run sft_small benchmarks/bench_sft.py --model small
run sft_smollm2 benchmarks/bench_sft.py --model smollm2
run dpo_tiny benchmarks/bench_dpo.py --model tiny
run dpo_smollm2 benchmarks/bench_dpo.py --model smollm2 --rounds 3
run scoring_tiny benchmarks/bench_scoring.py --model tiny
run scoring_smollm2 benchmarks/bench_scoring.py --model smollm2 --rounds 3
run memory_smollm2 benchmarks/bench_memory.py --model smollm2
run chunks_smollm2 benchmarks/bench_chunks.py --model smollm2
run compile_smollm2 benchmarks/bench_compile.py --model smollm2 --every_position
run profile_smollm2 benchmarks/profile_step.py --model smollm2 --members 4

# The critical alpha's checks (docs/critical_alpha.md); figures next to the tables, not over docs/images/.
run toy_critical_alpha examples/toy_critical_alpha.py --output benchmarks/results/toy_critical_alpha.png
run critical_alpha_lm examples/critical_alpha_lm.py --output benchmarks/results/critical_alpha_lm.png

# The real-data quality study, quick versions (docs/quality.md); each run writes its own quality_<task>_quick files.
if [[ -f benchmarks/quality/data/quick/analogies_train.jsonl && -f benchmarks/quality/data/quick/mmlu_train.jsonl ]]
then
    for task in analogies mmlu; do
        echo "== quality_${task}_quick: python -m benchmarks.quality.run --task $task --quick --threads 1" >&2
        "$PY" -m benchmarks.quality.run --task "$task" --quick --threads 1
    done
else
    echo "left out: the quality quick runs (docs/quality.md): no data in benchmarks/quality/data/quick; run make quality-data first"
fi
echo "left out: the full quality tables (quality_analogies.md, 3 seeds, about 2 h on this CPU): make bench-quality"
echo "left out: quality_analogies_quick_alpha.md and _levers.md: sweeps of --rows and flags, each file starts with its commands"
if [[ -f benchmarks/quality/data/quick/survey_anes_train.jsonl ]]; then
    echo "== quality_survey_quick: python -m benchmarks.quality.run --task survey --quick --threads 1" >&2
    "$PY" -m benchmarks.quality.run --task survey --quick --threads 1
else
    echo "left out: quality_survey_quick.md (docs/quality.md): no survey data; run make quality-data first"
fi
echo "left out: quality_survey.md (3 seeds, about 45 CPU minutes): python -m benchmarks.quality.run --task survey"
echo "left out: quality_epochs*.md (about 8 CPU minutes per row and seed; each file starts with its commands)"
echo "left out: critical_alpha.md and collapse_smollm2.md (hand-written notes beside the tables): python benchmarks/bench_critical_alpha.py, python benchmarks/bench_collapse.py [--train_steps 60]"
echo "left out: the demo's numbers (docs/demo.md): make demo and renyi-lora demo --real_text only write their own report"
