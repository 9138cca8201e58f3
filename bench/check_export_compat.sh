#!/usr/bin/env bash
# Does an export (python -m perpcs export) load in the stack vLLM pins (transformers 4.x, peft 0.17) with the same
# numbers as in the project's stack (transformers 5, peft 0.21)? docs/serving.md; result in bench/NOTES.md.
#
#   bench/check_export_compat.sh                      # a tiny SmolLM2 run (stage 1 + OPPU, minutes on 2 cores)
#   EXPORT_DIR=exported/movie_tagging bench/check_export_compat.sh    # an existing export instead
#
# Builds $COMPAT_VENV (default /tmp/compat-venv) once if missing: torch==2.13.0 (the local CPU wheel),
# transformers<5 (>= 4.45), peft 0.17.*, from PyPI. Each stack loads base/ + one adapter in a fresh process
# (AutoPeftModelForCausalLM by the adapter's name, AutoTokenizer from base/), tokenizes the same text and writes
# the last-token logits; the check fails when token ids differ, logits differ by more than 1e-3, the rope base
# read differs, or peft 0.17 warns about the adapter config. Exit 0 = compatible.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; esac   # the loads below run from another directory
COMPAT_VENV=${COMPAT_VENV:-/tmp/compat-venv}
TOL=${TOL:-1e-3}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ ! -x "$COMPAT_VENV/bin/python" ] || ! "$COMPAT_VENV/bin/python" -c 'import transformers, peft' 2>/dev/null; then
  echo "# building $COMPAT_VENV (transformers 4.x + peft 0.17), once"
  python3 -m venv "$COMPAT_VENV"
  "$COMPAT_VENV/bin/pip" install -q torch==2.13.0 'transformers>=4.45,<5' 'peft==0.17.*'
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/export-compat.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
if [ -z "${EXPORT_DIR:-}" ]; then
  echo "# a tiny run on the bundled SmolLM2 in $WORK: sample data, profiles, stage 1 (4 steps), OPPU (1 step, 1 user), export"
  TASK=movie_tagging
  "$PY" data/make_sample.py --task_name $TASK --out_dir "$WORK/raw" --n_users 12 --n_history 6 --n_queries 2 >/dev/null
  "$PY" data/prepare_lamp.py --task_name $TASK --lamp_dir "$WORK/raw" --out_dir "$WORK/data" --n_test 1 >/dev/null
  "$PY" data/gen_profile.py --task_name $TASK --data_dir "$WORK/data" --device cpu --k 2 --max_gen_len 4 \
    --max_seq_len 512 --batch_size 12 >/dev/null   # the stages read profiles; their text does not matter here
  COMMON=(--task_name $TASK --data_dir "$WORK/data" --device cpu --max_seq_len 256 --k_list 1 --temperature 0
          --max_gen_len 2)
  # lr 3e-3: a task LoRA that moves the logits, so a base read without it would show
  "$PY" task_LoRA.py "${COMMON[@]}" --output_dir "$WORK/out/task-base_LLM" --max_step 4 --lr 3e-3 >/dev/null
  "$PY" OPPU.py "${COMMON[@]}" --lora_ckpt "$WORK/out/task-base_LLM" --output_dir "$WORK/out/OPPU" \
    --max_step 1 >/dev/null
  EXPORT_DIR=$WORK/export
  "$PY" -m perpcs export --task_name $TASK --output_dir "$EXPORT_DIR" --output_root "$WORK/out" | head -1
fi
EXPORT_DIR=$(cd "$EXPORT_DIR" && pwd)
ADAPTER=$(find "$EXPORT_DIR/adapters" -mindepth 2 -maxdepth 2 -type d -name 'user_*' | sort | head -1)
[ -n "$ADAPTER" ] || { echo "error: no adapter under $EXPORT_DIR/adapters" >&2; exit 2; }

cat > "$WORK/load.py" <<'EOF'
import json, sys, warnings
import torch
warnings.simplefilter("always")          # this probe only: record every warning the loading gives
with warnings.catch_warnings(record=True) as caught:
    import peft, transformers
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer
    adapter, out = sys.argv[1], sys.argv[2]
    model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    base = model.peft_config["default"].base_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer("Which tag fits this movie? A crew of thieves plans a heist on a space station.",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
config = model.base_model.model.config
rope = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
torch.save({"ids": ids[0], "logits": logits}, out)
print(json.dumps({"transformers": transformers.__version__, "peft": peft.__version__,
                  "tokenizer": type(tokenizer).__name__, "rope_theta": rope, "n_ids": int(ids.shape[1]),
                  "argmax": int(logits.argmax()),
                  "peft_config_warnings": [str(w.message)[:200] for w in caught
                                           if "Unexpected keyword" in str(w.message)]}))
EOF
cd "$WORK"   # neither stack may find base/ through the working directory: the adapter names it
NEW=$("$PY" "$WORK/load.py" "$ADAPTER" "$WORK/new.pt" 2>/dev/null | tail -1)
OLD=$("$COMPAT_VENV/bin/python" "$WORK/load.py" "$ADAPTER" "$WORK/old.pt" 2>/dev/null | tail -1)
cd "$OLDPWD"
echo "adapter: ${ADAPTER#"$EXPORT_DIR"/}"
echo "project stack: $NEW"
echo "4.x stack:     $OLD"
"$PY" - "$WORK/new.pt" "$WORK/old.pt" "$TOL" "$NEW" "$OLD" <<'EOF'
import json, sys
import torch
new, old = torch.load(sys.argv[1]), torch.load(sys.argv[2])
tol, info_new, info_old = float(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
problems = []
if not torch.equal(new["ids"], old["ids"]):
    problems.append("the two tokenizers give other token ids")
diff = float((new["logits"] - old["logits"]).abs().max()) if new["logits"].shape == old["logits"].shape else None
print(f"max |logit difference| (last token): {diff}  (tolerance {tol})")
if diff is None or diff > tol:
    problems.append(f"last-token logits differ by {diff}")
if info_new["rope_theta"] != info_old["rope_theta"]:
    problems.append(f"rope_theta read as {info_new['rope_theta']} vs {info_old['rope_theta']}")
if info_old["peft_config_warnings"]:
    problems.append(f"peft {info_old['peft']} warns: {info_old['peft_config_warnings']}")
print("COMPATIBLE" if not problems else "NOT COMPATIBLE: " + "; ".join(problems))
sys.exit(1 if problems else 0)
EOF
