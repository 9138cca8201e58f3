"""What makes an export folder serve outside this project's own stack (docs/serving.md):

- base/ read identically by transformers 4.x (>= 4.45; vLLM pins ``transformers<5``) and 5.x: 5.x writes the rope
  base inside ``rope_parameters`` and names its generic tokenizer ``TokenizersBackend``, which 4.x does not know
  (it then reads rope_theta as 10000, silently, and refuses the tokenizer);
- adapter configs without the keys peft 0.17 does not know (it warns about each), where they hold their defaults;
- the vLLM command and one request per user, built from the export's manifest;
- a short model card (README.md) per adapter instead of peft's empty template.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from perpcs.data.layout import read_json

# LoraConfig keys newer than peft 0.17 (the release beside transformers 4.x), with the value that means "feature
# unused": at that value the key changes nothing, so dropping it lets 0.17 read the config without a warning.
# A key holding another value is kept: the adapter uses the feature, and 0.17 is right to warn.
NEWER_LORA_KEYS = {"alora_invocation_tokens": None, "arrow_config": None, "ensure_weight_tying": False,
                   "kasa_config": None, "lora_ga_config": None, "monteclora_config": None, "use_bdlora": None,
                   "velora_config": None}
# 5.x's name of "a tokenizer.json as is"; 4.x calls the same class PreTrainedTokenizerFast
GENERIC_TOKENIZER = {"TokenizersBackend": "PreTrainedTokenizerFast"}
SERVED_BASE = "base"           # --served-model-name of the base in the vLLM command


def _rewrite_json(path: Path, change) -> None:
    data = read_json(path, path.name)
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_base_portable(base_dir: Path) -> None:
    """config.json and tokenizer_config.json as both transformers 4.x and 5.x read them (same numbers)."""
    def config(c: dict) -> None:
        rope = c.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            c.setdefault("rope_theta", rope["rope_theta"])          # where 4.x looks; 5.x reads rope_parameters
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            if scaling.get("rope_type", "default") != "default":    # 4.x reads a scaled rope from rope_scaling
                c.setdefault("rope_scaling", scaling)
        if "dtype" in c:
            c.setdefault("torch_dtype", c["dtype"])                 # 4.x before 4.56 reads torch_dtype only

    def tokenizer(t: dict) -> None:
        t["tokenizer_class"] = GENERIC_TOKENIZER.get(t.get("tokenizer_class"), t.get("tokenizer_class"))

    _rewrite_json(base_dir / "config.json", config)
    if (base_dir / "tokenizer_config.json").is_file():
        _rewrite_json(base_dir / "tokenizer_config.json", tokenizer)


def portable_adapter_config(config: dict) -> dict:
    """The adapter config without the keys peft 0.17 does not know, where they hold their 'unused' value; the
    peft version that wrote it moves to the model card (0.17 warns about it as an unknown key too)."""
    return {k: v for k, v in config.items()
            if k != "peft_version" and not (k in NEWER_LORA_KEYS and v == NEWER_LORA_KEYS[k])}


def served_name(kind: str, uid: str) -> str:
    """The adapter's name in vLLM (--lora-modules name=path; the request's "model")."""
    return f"{kind}-{uid}"


def vllm_command(manifest: dict, export_dir: str = ".") -> list:
    """``vllm serve`` of the export's base with every adapter of its manifest (argv list, paths under export_dir)."""
    root = export_dir.rstrip("/") or "."
    modules = [f"{served_name(kind, uid)}={root}/{entry['path']}"
               for kind, users in manifest["adapters"].items() for uid, entry in sorted(users.items())]
    ranks = [entry["r"] for users in manifest["adapters"].values() for entry in users.values()]
    return (["vllm", "serve", f"{root}/{manifest['base']}", "--served-model-name", SERVED_BASE, "--enable-lora",
             "--max-lora-rank", str(max(ranks, default=8))] + (["--lora-modules", *modules] if modules else []))


def request_example(name: str, prompt: str = "<the prompt>", max_tokens: int = 16) -> str:
    body = json.dumps({"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    return (f"curl http://localhost:8000/v1/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)}")


def serve_script(manifest: dict, max_tokens: int) -> str:
    """serve.sh: the vLLM command, then one request per exported user (run from the export folder)."""
    lines = ["#!/usr/bin/env sh", "# Written by python -m perpcs export from export.json: run from this folder.",
             "# Start the server (vLLM's multi-LoRA; --max-loras sets how many adapters one batch may mix):",
             " \\\n    ".join(shlex.join(part) for part in _wrapped(vllm_command(manifest))), "",
             "# then, from another shell, one request per user (the prompt: python -m perpcs show-prompts):"]
    for kind, users in manifest["adapters"].items():
        lines += [f"# {request_example(served_name(kind, uid), f'<prompt of user {uid}>', max_tokens)}"
                  for uid in sorted(users)]
    return "\n".join(lines) + "\n"


def _wrapped(argv: list) -> list:
    """argv in lines: the serve part, then one --lora-modules entry a line."""
    if "--lora-modules" not in argv:
        return [argv]
    i = argv.index("--lora-modules") + 1
    return [argv[:i]] + [[m] for m in argv[i:]]


def model_card(kind: str, uid: str, entry: dict, manifest: dict, settings: dict | None) -> str:
    """README.md of one exported adapter: whose it is, how it was made, where its predictions are."""
    method = {"sharers": "a sharer's LoRA (Per-Pcs stage 3), trained on that sharer's history",
              "per-pcs": "Per-Pcs: assembled from the sharers' pieces by the gates (stage 5), no gradient step",
              "oppu": "OPPU baseline: a LoRA trained on this user's own history"}[kind.split("-leaderboard")[0]]
    lines = [f"# {manifest['task']}: user {uid} ({kind})", "",
             f"- user: `{uid}`" + (" (LaMP leaderboard question, no gold)" if kind.endswith("-leaderboard") else ""),
             f"- method: {method}",
             f"- base: `../../../{manifest['base']}` = base model `{manifest['base_model_path']}` with the task LoRA "
             f"(sha256 {manifest['task_lora_sha256'][:12]}...) merged; rank {entry['r']}",
             f"- made from: `{entry['from']}` (under `{manifest['output_root']}`)"]
    if entry.get("predictions"):
        lines.append(f"- its predictions: `{entry['predictions']}` (under `{manifest['output_root']}`)")
    if entry.get("peft_version"):
        lines.append(f"- saved by peft {entry['peft_version']}")
    if settings:
        lines += ["", "Settings (recipe or training run):", "", "```json",
                  json.dumps(settings, indent=1, sort_keys=True), "```"]
    lines += ["", f"Serve: `vllm serve ... --lora-modules {served_name(kind, uid)}={entry['path']}` (see serve.sh "
                  f"in the export folder)."]
    return "\n".join(lines) + "\n"
