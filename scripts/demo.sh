#!/usr/bin/env bash
# The whole method on one command, on the CPU with the bundled SmolLM2-135M and generated sample data:
# sample data -> profiles -> stages 1-5 -> OPPU -> evaluation -> output/<task>/results.md.
# Settings are scaled down from the paper's (see docs/demo-and-results.md) so that it ends in minutes on 2 cores.
# Re-running continues where it stopped; `make clean` starts over.
# The settings (the flags of every step below) are in perpcs/experiments/demo.py, shared with the held-out-seed
# study (scripts/study.py, docs/study.md) that chose them; `python -m perpcs demo-flags <step>` prints a step's command.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${TASK:-movie_tagging}
PY=${PYTHON:-.venv/bin/python}
DEMO_ENV=$($PY -m perpcs demo-flags env)
export $DEMO_ENV
OUT=output/$TASK
# MAX_GEN_LEN=n sets the new tokens per answer for every task (default: the task's own length, perpcs/data/tasks.py)
run() {   # run one demo step: $PY with each command perpcs/experiments/demo.py gives for it (one a line, quoted)
  local cmds line
  cmds=$($PY -m perpcs demo-flags "$1" --task_name "$TASK" ${MAX_GEN_LEN:+--max_gen_len "$MAX_GEN_LEN"})
  while IFS= read -r line <&3; do   # fd 3: the commands' stdin stays the demo's
    eval "set -- $line"
    $PY "$@"
  done 3<<< "$cmds"
}
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

step "0. sample data (LaMP format) and the project layout"
if [ ! -f "data/$TASK/test_100/golds.json" ]; then
  run sample
fi

step "0b. profile texts (PAG)"
run profiles

step "1. task LoRA + non-personalized / RAG / PAG baselines"
run task-lora

step "2. sharer selection"
run sharers

step "3. sharer LoRAs"
run sharer-loras

step "4. sharer gates"
run gates

step "5. Per-Pcs composition + predictions"
run compose

step "OPPU baseline (one LoRA per target user)"
run oppu

step "controls: user-blind rows from the same sharers and gates (uniform mix, swapped history, peft merge)"
run controls

step "PEFT retrieval: one sharer's whole LoRA per user (nearest sharer by history embedding, random sharer)"
run retrieval

step "base model without any LoRA (where every method starts)"
run base-only

step "6. evaluation"
mkdir -p "$OUT"
run report      # with the sample's latent groups (data/sample_groups/<task>.json) when there: routing share
run explain > "$OUT/explain.txt"
echo "explain: $OUT/LoRA-Composition/explain/ (explain.md, one heatmap per user)"
echo "demo finished in $(( $(date +%s) - start ))s"
