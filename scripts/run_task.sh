#!/usr/bin/env bash
# Per-Pcs on one task at the paper's settings (Llama-2-7b on CUDA): the published commands of the README (docs/real-lamp.md), in order.
#
#   scripts/run_task.sh movie_tagging
#   PY=.venv/bin/python LLAMA=/models/Llama-2-7b LAMP_DIR=/data/LaMP/movie_tagging scripts/run_task.sh movie_tagging
#   DRY_RUN=1 scripts/run_task.sh movie_tagging      # print every command, run nothing
#   EXTRA_TASK_LORA="--epochs 3" SHARER_K=20 scripts/run_task.sh LaMP_2M
#
# The task: any name the Python tools take (movie_tagging, LaMP_2M, LaMP-2M, lamp2m, LaMP_3, product_rating, ...),
# resolved by perpcs/data/tasks.py (get_task) with $PY.
#
# Variables: PY (the project's .venv/bin/python when it exists, else python), LLAMA (./llama_download/Llama-2-7b), DEVICE (cuda), LAMP_DIR (the task's LaMP folder as
# downloaded: train/ dev/ test/ subfolders or flat files; needed only while data/<task>/ does not exist), PROFILE_MODEL (the model writing the PAG profiles;
# default $LLAMA), ENCODER (step 2's history encoder: a Hugging Face id or a local directory; default the paper's
# microsoft/deberta-v3-large, read from the Hugging Face cache, downloaded into it when the hub can be reached),
# MAX_GEN_LEN (new tokens per answer for every predicting step; default each task's own, perpcs/data/tasks.py),
# SHARER_K (step 2's --k, the number of sharers; default 50, the paper's), and EXTRA_<STEP> (more flags for one
# step, split on spaces, appended after the script's own so they win: EXTRA_DATA EXTRA_PROFILES EXTRA_TASK_LORA
# EXTRA_SHARERS EXTRA_SHARER_LORAS EXTRA_GATES EXTRA_COMPOSE EXTRA_OPPU EXTRA_EVAL).
# Each command is printed ("+ ...") before it runs, so it can be copied and run by hand. Re-running continues
# where it stopped: a step whose final output exists is skipped, and the per-user steps (profiles, sharer
# LoRAs, gates, composition, OPPU) skip the users already done without loading the model when none is left.
# The training steps batch in the published (shuffled) order, the stages' default: --group_by_length (the
# demo's speed option, which changes the batches) is not passed.
set -euo pipefail
REQUESTED=${1:?usage: scripts/run_task.sh <task> (a task name or LaMP id: movie_tagging, LaMP_2M, LaMP_3, ...)}
cd "$(dirname "$0")/.."

if [ -z "${PY:-}" ]; then   # the project's venv (make setup) unless PY says otherwise
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
command -v "$PY" >/dev/null || { echo "error: no Python interpreter '$PY' here: set PY (e.g. PY=.venv/bin/python)" >&2; exit 2; }
# the task's project name from the Python task registry (the one list of names and spellings); exit 2 if unknown
TASK=$(PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import sys
from perpcs.data.tasks import get_task
from perpcs.errors import PerpcsError
try:
    print(get_task(sys.argv[1]).name)
except PerpcsError as err:
    sys.exit(f"error: {err}")' "$REQUESTED") || exit 2
SHARER_K=${SHARER_K:-50}
extra() {   # the words of EXTRA_<step> (empty when unset)
  local name="EXTRA_$1"
  read -ra EXTRA <<< "${!name:-}"
}
LLAMA=${LLAMA:-./llama_download/Llama-2-7b}
DEVICE=${DEVICE:-cuda}
LAMP_DIR=${LAMP_DIR:-}
PROFILE_MODEL=${PROFILE_MODEL:-$LLAMA}
DRY_RUN=${DRY_RUN:-}
GEN=(${MAX_GEN_LEN:+--max_gen_len "$MAX_GEN_LEN"})   # empty: the task's own length
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; esac   # a relative interpreter path must survive the cd of step 2
OUT=./output/$TASK
LORA_CKPT=$OUT/task-base_LLM/lora_ckpt.pt
GOLDS=data/$TASK/test_100/golds.json

run() {       # print the command, then run it
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ -n "$DRY_RUN" ] || "$@"
}
run_in() {    # the same, from inside a directory
  local dir=$1; shift
  printf '+ (cd %q &&' "$dir"; printf ' %q' "$@"; printf ')\n'
  [ -n "$DRY_RUN" ] || (cd "$dir" && "$@")
}
done_already() {   # true (and says so) when the step's final output exists; a dry run prints every step
  if [ -z "$DRY_RUN" ] && [ -e "$1" ]; then echo "# $2: done ($1 exists), skipped"; return 0; fi
  return 1
}
step() { echo; echo "### $*"; }

step "0. data/$TASK from the raw LaMP files"
if [ -n "$LAMP_DIR" ] && [ -z "$DRY_RUN" ] && [ -e "data/$TASK/test_100/user_test_100.json" ]; then
  echo "# note: LAMP_DIR is set but data/$TASK/ exists (from an earlier run, or the demo's sample data);" \
       "it is used as is: delete data/$TASK/ to convert $LAMP_DIR" >&2
fi
if ! done_already "data/$TASK/test_100/user_test_100.json" "data"; then
  if [ -z "$LAMP_DIR" ] && [ -z "$DRY_RUN" ]; then
    echo "error: data/$TASK/ does not exist; set LAMP_DIR to the task's LaMP folder as downloaded (the one" \
         "holding train/ dev/ test/, or train_questions.json / train_outputs.json / dev_* directly)" >&2
    exit 2
  fi
  extra DATA
  run "$PY" data/prepare_lamp.py --task_name "$TASK" --lamp_dir "${LAMP_DIR:-LaMP/$TASK}" --out_dir data ${EXTRA[@]+"${EXTRA[@]}"}
fi

step "0b. PAG profile texts (resumes per user)"
extra PROFILES
run "$PY" data/gen_profile.py --task_name "$TASK" --model_path "$PROFILE_MODEL" --device "$DEVICE" ${EXTRA[@]+"${EXTRA[@]}"}

step "1. task LoRA, then the non-personalized / RAG / PAG predictions"
if ! done_already "$OUT/task-base_LLM/predictions/k4-profile.json" "step 1"; then
  extra TASK_LORA
  run "$PY" task_LoRA.py --task_name "$TASK" --llama_model_path "$LLAMA" --device "$DEVICE" ${GEN[@]+"${GEN[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
fi

step "2. sharer selection (k-means over history embeddings)"
ENCODER=${ENCODER:-microsoft/deberta-v3-large}            # the paper's encoder (docs/method.md section 5)
if [ -d "$ENCODER" ]; then ENCODER=$(cd "$ENCODER" && pwd); fi   # a local directory must survive the cd
extra SHARERS
run_in anchor_selection "$PY" history_anchor.py --candidate_path "../data/$TASK/user_anchor_candidate.json" \
  --task_name "$TASK" --k "$SHARER_K" --device "$DEVICE" --encoder "$ENCODER" ${EXTRA[@]+"${EXTRA[@]}"}

step "3. one LoRA per sharer (resumes per sharer)"
extra SHARER_LORAS
run "$PY" train_anchor_PEFT.py --task_name "$TASK" --llama_model_path "$LLAMA" --device "$DEVICE" \
  --lora_ckpt "$LORA_CKPT" --output_dir "$OUT/Anchor_PEFT/LoRA" ${EXTRA[@]+"${EXTRA[@]}"}

step "4. gates of every sharer piece (resumes per sharer)"
extra GATES
run "$PY" train_anchor_gate.py --task_name "$TASK" --llama_model_path "$LLAMA" --device "$DEVICE" \
  --lora_ckpt "$LORA_CKPT" --anchor_path "$OUT/Anchor_PEFT" --output_dir "$OUT/Anchor_PEFT/gate" ${EXTRA[@]+"${EXTRA[@]}"}

step "5. Per-Pcs: assemble each target user's LoRA, then predict (resumes per user; refuses old settings)"
extra COMPOSE
run "$PY" lora_composition.py --task_name "$TASK" --llama_model_path "$LLAMA" --device "$DEVICE" \
  --output_dir "$OUT/LoRA-Composition" --lora_ckpt "$LORA_CKPT" --gate_dir "$OUT/Anchor_PEFT/gate" \
  --anchor_dir "$OUT/Anchor_PEFT/LoRA" --topk 3 --recent_k 2000 --share_ratio 1 --agg_temperature 1 ${GEN[@]+"${GEN[@]}"} \
  ${EXTRA[@]+"${EXTRA[@]}"}

step "OPPU baseline: one LoRA trained per target user (resumes per user)"
extra OPPU
run "$PY" OPPU.py --task_name "$TASK" --llama_model_path "$LLAMA" --device "$DEVICE" --lora_ckpt "$LORA_CKPT" \
  ${GEN[@]+"${GEN[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}

step "6. metrics of every prediction file, then the results table of all tasks"
extra EVAL
for method in task-base_LLM OPPU LoRA-Composition; do
  for variant in kNP k1 k2 k4 kNP-profile k1-profile k2-profile k4-profile; do
    preds=$OUT/$method/predictions/$variant.json
    if [ -n "$DRY_RUN" ] || [ -f "$preds" ]; then
      run "$PY" eval/eval_task.py --golds_json "$GOLDS" --data_dir data --preds_json "$preds" \
        --task_name "$TASK" --output_file "$OUT/$method/metrics/$variant.json" ${EXTRA[@]+"${EXTRA[@]}"}
    fi
  done
done
run "$PY" eval/eval_all.py --output_root output --data_dir data --out_prefix output/results
