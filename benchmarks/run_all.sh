#!/usr/bin/env bash
# Every benchmark, one after another (they time side by side within a run; never run two at once), each table
# written to benchmarks/results/<name>.md. About 45 minutes on an idle 2-core CPU VM.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
run() {
    local name=$1; shift
    echo "== $name: python $*" >&2
    .venv/bin/python "$@" > "benchmarks/results/$name.md"
}
mkdir -p benchmarks/results
run sft_tiny benchmarks/bench_sft.py --model tiny
run sft_small benchmarks/bench_sft.py --model small
run sft_smollm2 benchmarks/bench_sft.py --model smollm2
run dpo_tiny benchmarks/bench_dpo.py --model tiny
run dpo_smollm2 benchmarks/bench_dpo.py --model smollm2 --rounds 3
run scoring_tiny benchmarks/bench_scoring.py --model tiny
run scoring_smollm2 benchmarks/bench_scoring.py --model smollm2 --rounds 3
run memory_smollm2 benchmarks/bench_memory.py --model smollm2
run chunks_smollm2 benchmarks/bench_chunks.py --model smollm2
