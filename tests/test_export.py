"""``python -m perpcs export``: the merged base and every adapter on it, loadable by peft's AutoPeftModel from the
export folder alone, giving the stages' own predictions; readable files; refusals naming the file."""
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from pipeline_fixture import TASK, cli_error, pipe  # noqa: F401 - pipe is a fixture

ROOT = Path(__file__).resolve().parents[1]


def export_main(argv):
    from perpcs.__main__ import main
    return main(["export", *map(str, argv)])


@pytest.fixture(scope="module")
def outputs(pipe, tmp_path_factory):
    """The shared pipeline's stage outputs copied into one output root (output/<task>/ layout), plus OPPU."""
    import sys
    sys.path.insert(0, str(ROOT))
    import OPPU
    from perpcs.errors import run_cli
    root = tmp_path_factory.mktemp("export") / "out"
    for src, rel in ((pipe.task_lora, "task-base_LLM"), (pipe.anchor_peft, "Anchor_PEFT/LoRA"),
                     (pipe.anchor_gate, "Anchor_PEFT/gate"), (pipe.composition, "LoRA-Composition")):
        shutil.copytree(src, root / rel)
    run_cli(lambda: OPPU.main(pipe.oppu_args(root / "OPPU")))
    # leaderboard outputs (--test_split leaderboard writes them under leaderboard/): a test user's, renamed
    uid = pipe.test_ids()[0]
    shutil.copytree(root / "OPPU" / "adapters" / f"user_{uid}", root / "OPPU/leaderboard/adapters/user_lb1")
    (root / "LoRA-Composition/leaderboard/recipes").mkdir(parents=True)
    shutil.copyfile(root / "LoRA-Composition/recipes" / f"user_{uid}.json",
                    root / "LoRA-Composition/leaderboard/recipes/user_lb1.json")
    return root


@pytest.fixture(scope="module")
def exported(pipe, outputs):
    from perpcs.errors import run_cli
    target = outputs.parent / "export"
    run_cli(lambda: export_main(["--task_name", TASK, "--output_dir", target, "--output_root", outputs,
                                 "--llama_model_path", pipe.model]))
    return target


def stage_predictions(pipe, adapter: Path, predictions_file: Path, base=None) -> tuple:
    """(the stage's predictions of one user, the predictions of the exported adapter loaded by AutoPeftModel from
    the export dir, with the same generation settings and prompts); ``base``: the adapter on that model instead."""
    import torch
    from peft import AutoPeftModelForCausalLM

    from perpcs.data.layout import user_id
    from perpcs.models.loading import load_tokenizer
    from perpcs.stages.target_users import predict_one_user, read_user_predictions
    from perpcs.stages.config import GenerationConfig
    settings, expected = read_user_predictions(predictions_file)
    uid = adapter.name.removeprefix("user_")
    layout = pipe.layout
    user = next(u for u in json.loads(layout.test_users.read_text()) if user_id(u) == uid)
    if base is None:   # by name: the adapter's config names the export's base
        model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    model.eval()
    tokenizer = load_tokenizer(model.peft_config["default"].base_model_name_or_path if base is None else base)
    gen = GenerationConfig(**{**settings, "k_list": tuple(settings["k_list"])})
    got = predict_one_user(model, tokenizer, layout.task, user, layout.load_profiles(), layout.profiles,
                           torch.device("cpu"), gen)
    return expected, got["predictions"]


def test_exported_adapters_give_the_stages_predictions(pipe, outputs, exported, monkeypatch):
    from transformers import AutoModelForCausalLM
    manifest = json.loads((exported / "export.json").read_text())
    assert sorted(manifest["adapters"]["sharers"]) == sorted(pipe.sharer_ids())
    assert sorted(manifest["adapters"]["per-pcs"]) == sorted(pipe.test_ids())
    assert sorted(manifest["adapters"]["oppu"]) == sorted(pipe.test_ids())
    assert list(manifest["adapters"]["oppu-leaderboard"]) == list(manifest["adapters"]["per-pcs-leaderboard"]) \
        == ["lb1"]
    for kind in manifest["adapters"]:
        for d in sorted((exported / "adapters" / kind).iterdir()):
            config = json.loads((d / "adapter_config.json").read_text())
            assert config["base_model_name_or_path"] == str(exported.resolve() / "base"), d
    uid = pipe.test_ids()[0]
    # by name from any working directory (peft reads a relative base path against it: "./base" failed here)
    monkeypatch.chdir(exported.parent)
    for adapter, preds in ((Path("adapters/per-pcs") / f"user_{uid}", outputs / "LoRA-Composition"),
                           (Path("adapters/oppu") / f"user_{uid}", outputs / "OPPU")):
        expected, got = stage_predictions(pipe, exported / adapter, preds / "user_predictions" / f"user_{uid}.json")
        assert got == expected, adapter
    # the export moves: copied elsewhere (the original gone), base and adapter loaded from there
    moved = exported.parent / "moved"
    shutil.copytree(exported, moved)
    hidden = exported.parent / "hidden"
    exported.rename(hidden)
    try:
        base = AutoModelForCausalLM.from_pretrained(str(moved / "base"))
        assert str(base.dtype) == "torch.float32"   # the tiny model's own dtype
        expected, got = stage_predictions(pipe, moved / "adapters/oppu" / f"user_{uid}",
                                          outputs / "OPPU/user_predictions" / f"user_{uid}.json", base=moved / "base")
        assert got == expected
    finally:
        hidden.rename(exported)
    # greedy text on a tiny random model hardly moves with the task LoRA: the logits must be those of raw base +
    # task LoRA merged + the stage's own adapter (built here with plain peft), not those of raw base + adapter
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    ids = torch.tensor([[1, 17, 42, 99, 7, 230, 5]])
    for exported_adapter, original in ((Path("adapters/oppu") / f"user_{uid}", outputs / "OPPU/adapters"),
                                       (Path("adapters/sharers") / f"user_{pipe.sharer_ids()[0]}",
                                        outputs / "Anchor_PEFT/LoRA")):
        original = original / exported_adapter.name
        got = AutoPeftModelForCausalLM.from_pretrained(str(exported / exported_adapter)).eval()(ids).logits
        raw = AutoModelForCausalLM.from_pretrained(str(pipe.model))
        merged = PeftModel.from_pretrained(raw, str(outputs / "task-base_LLM")).merge_and_unload()
        want = PeftModel.from_pretrained(merged, str(original)).eval()(ids).logits
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(pipe.model)),
                                             str(original)).eval()(ids).logits
        torch.testing.assert_close(got, want)
        assert not torch.allclose(unmerged, want, atol=1e-4)


def test_the_base_is_the_merged_model(pipe, outputs, exported):
    """base/ holds base + task LoRA merged: its q_proj weights are W + scale * B @ A of the task LoRA."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    raw = AutoModelForCausalLM.from_pretrained(str(pipe.model)).state_dict()
    merged = load_file(str(exported / "base" / "model.safetensors"))
    lora = load_file(str(outputs / "task-base_LLM" / "adapter_model.safetensors"))
    config = json.loads((outputs / "task-base_LLM" / "adapter_config.json").read_text())
    name = "model.layers.0.self_attn.q_proj"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    want = raw[f"{name}.weight"] + config["lora_alpha"] / config["r"] * b @ a
    assert not torch.equal(raw[f"{name}.weight"], want)
    torch.testing.assert_close(merged[f"{name}.weight"], want)
    assert (exported / "base" / "tokenizer.json").is_file()


def test_exported_files_are_readable(exported):
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in exported.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files) and any(p.suffix == ".safetensors"
                                                                          for p in (exported / "base").iterdir())
    assert {p.relative_to(exported).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files} == \
        {p.relative_to(exported).as_posix(): 0o666 & ~mask for p in files}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o777 & ~mask for p in exported.rglob("*") if p.is_dir())


def test_refuses_without_stage_1(pipe, tmp_path, capsys):
    err = cli_error(export_main, ["--task_name", TASK, "--output_dir", tmp_path / "d", "--output_root",
                                  tmp_path / "nothing", "--llama_model_path", pipe.model], capsys)
    assert str(tmp_path / "nothing" / "task-base_LLM") in err and "stage 1" in err
    assert not (tmp_path / "d").exists()


def test_refuses_outputs_made_on_another_task_lora(pipe, outputs, tmp_path, capsys):
    root = tmp_path / "out"
    shutil.copytree(outputs, root)
    source = root / "OPPU" / "adapters" / f"user_{pipe.test_ids()[0]}" / "source.json"
    recorded = json.loads(source.read_text())
    source.write_text(json.dumps({**recorded, "task_lora_sha256": "0" * 64}))
    err = cli_error(export_main, ["--task_name", TASK, "--output_dir", tmp_path / "d", "--output_root", root,
                                  "--llama_model_path", pipe.model], capsys)
    assert str(source) in err and "task lora" in err
    assert not (tmp_path / "d").exists()


def test_refuses_a_non_empty_output_dir(pipe, outputs, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    err = cli_error(export_main, ["--task_name", TASK, "--output_dir", tmp_path / "d", "--output_root", outputs,
                                  "--llama_model_path", pipe.model], capsys)
    assert "not empty" in err and (tmp_path / "d" / "keep.txt").read_text() == "mine"


def test_finds_the_base_model_or_refuses_another(pipe, outputs, tmp_path, capsys):
    """Without --llama_model_path the base is the one the outputs' records name; another one is refused."""
    from perpcs.errors import run_cli
    run_cli(lambda: export_main(["--task_name", TASK, "--output_dir", tmp_path / "found", "--output_root", outputs]))
    assert json.loads((tmp_path / "found" / "export.json").read_text())["base_model_path"] == str(pipe.model)
    other = tmp_path / "other_model"
    shutil.copytree(pipe.model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5 + config["rms_norm_eps"]}))
    err = cli_error(export_main, ["--task_name", TASK, "--output_dir", tmp_path / "d", "--output_root", outputs,
                                  "--llama_model_path", other], capsys)
    assert "source.json" in err and "another base model" in err and not (tmp_path / "d").exists()


@pytest.mark.slow
@pytest.mark.timeout(1200)   # hang guard: 100 s measured on a 2-core machine shared with other jobs
def test_bundled_model_export_gives_the_stages_predictions(smollm2_dir, tmp_path, monkeypatch):
    """On SmolLM2 (where the task LoRA changes answers): stages 1-5 and OPPU with tiny settings, export without
    --llama_model_path (found from the records), then AutoPeftModel from the export gives each stage's predictions."""
    import sys
    sys.path.insert(0, str(ROOT))
    import lora_composition
    import OPPU
    import task_LoRA
    import train_anchor_gate
    import train_anchor_PEFT
    from perpcs.errors import run_cli
    from perpcs.stages.sharer_selection import run_sharer_selection
    from pipeline_fixture import Pipeline, sample_layout
    out = tmp_path / "out"
    p = Pipeline(root=tmp_path, model=Path("smollm2"), data=tmp_path / "data", task_lora=out / "task-base_LLM",
                 anchor_idx=tmp_path / "anchor" / "anchor_user_idx.json", anchor_peft=out / "Anchor_PEFT" / "LoRA",
                 anchor_gate=out / "Anchor_PEFT" / "gate", composition=out / "LoRA-Composition", logs={})
    sample_layout(TASK, tmp_path, 9, 4, 1, 2)
    # a task LoRA that changes answers (2 steps at the default lr hardly move it)
    run_cli(lambda: task_LoRA.main(p.task_lora_args(p.task_lora) + ["--lr", "3e-3", "--max_step", "4"]))
    run_sharer_selection(TASK, candidate_path=p.layout.candidate_users, output_dir=p.anchor_idx.parent, k=2,
                         strategy="most_active", min_history=2)
    run_cli(lambda: train_anchor_PEFT.main(p.sharer_args(p.anchor_peft) + ["--max_step", "1"]))
    run_cli(lambda: train_anchor_gate.main(p.gate_args(p.anchor_gate) + ["--max_step", "1"]))
    run_cli(lambda: lora_composition.main(p.compose_args(p.composition) + ["--topk", "1"]))
    run_cli(lambda: OPPU.main(p.oppu_args(out / "OPPU")))
    target = tmp_path / "export"
    run_cli(lambda: export_main(["--task_name", TASK, "--output_dir", target, "--output_root", out]))
    monkeypatch.chdir(target)
    for uid in p.test_ids():
        for adapter, preds in ((Path("adapters/per-pcs") / f"user_{uid}", p.composition),
                               (Path("adapters/oppu") / f"user_{uid}", out / "OPPU")):
            expected, got = stage_predictions(p, target / adapter, preds / "user_predictions" / f"user_{uid}.json")
            assert got == expected, adapter
    # the test can tell: the stages' adapters on the raw base without the task LoRA (what loading the stage
    # outputs with AutoPeftModel gave before) answer otherwise
    unmerged = [stage_predictions(p, out / "OPPU/adapters" / f"user_{uid}",
                                  out / "OPPU/user_predictions" / f"user_{uid}.json", base=smollm2_dir)
                for uid in p.test_ids()]
    assert any(expected != got for expected, got in unmerged)


def test_refuses_a_recipe_whose_sharers_changed_after_its_gates(pipe, outputs, tmp_path, capsys):
    """A recipe weighs the sharer LoRAs as they were at stage 4: a sharer trained again since is caught."""
    root = tmp_path / "out"
    shutil.copytree(outputs, root)
    source = root / "Anchor_PEFT" / "gate" / f"user_{pipe.sharer_ids()[0]}" / "source.json"
    source.write_text(json.dumps({**json.loads(source.read_text()), "adapter_sha256": "0" * 64}))
    err = cli_error(export_main, ["--task_name", TASK, "--output_dir", tmp_path / "d", "--output_root", root,
                                  "--llama_model_path", pipe.model], capsys)
    assert "recipes/user_" in err and "trained again" in err and not (tmp_path / "d").exists()


def test_the_vllm_command_serves_every_exported_adapter(exported):
    """The command built from export.json names the base and every adapter by a path that exists in the export,
    with a unique served name each; serve.sh holds the same command and a request per adapter."""
    import shlex

    from perpcs.stages.serving import vllm_command
    manifest = json.loads((exported / "export.json").read_text())
    argv = vllm_command(manifest, str(exported))
    assert argv[:3] == ["vllm", "serve", f"{exported}/base"] and (exported / "base" / "config.json").is_file()
    assert argv[argv.index("--served-model-name") + 1] == "base" and "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    modules = argv[argv.index("--lora-modules") + 1:]
    names = [m.split("=", 1)[0] for m in modules]
    assert len(modules) == sum(len(users) for users in manifest["adapters"].values()) == len(set(names))
    for module in modules:
        path = Path(module.split("=", 1)[1])
        assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file(), module
    script = (exported / "serve.sh").read_text()
    assert shlex.join(vllm_command(manifest)[:8]) in script
    assert all(f'"model": "{name}"' in script for name in names)


def test_each_adapter_has_a_model_card_and_a_config_peft_017_reads(pipe, outputs, exported):
    from perpcs.stages.serving import NEWER_LORA_KEYS
    manifest = json.loads((exported / "export.json").read_text())
    uid = pipe.test_ids()[0]
    card = (exported / "adapters/oppu" / f"user_{uid}" / "README.md").read_text()
    assert f"user: `{uid}`" in card and "OPPU" in card and f"OPPU/user_predictions/user_{uid}.json" in card
    assert manifest["adapters"]["oppu"][uid]["predictions"] == f"OPPU/user_predictions/user_{uid}.json"
    card = (exported / "adapters/per-pcs" / f"user_{uid}" / "README.md").read_text()
    assert "Per-Pcs" in card and f"LoRA-Composition/recipes/user_{uid}.json" in card and '"topk"' in card
    for kind, users in manifest["adapters"].items():
        for entry in users.values():
            config = json.loads((exported / entry["path"] / "adapter_config.json").read_text())
            assert not set(config) & (set(NEWER_LORA_KEYS) | {"peft_version"}), entry
    config = json.loads((exported / "base" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert json.loads((exported / "base" / "tokenizer_config.json").read_text())["tokenizer_class"] != \
        "TokenizersBackend"


def test_the_compatibility_check_script_is_valid_bash():
    """bench/check_export_compat.sh (run by hand: it builds a second venv from PyPI) at least parses."""
    import subprocess
    result = subprocess.run(["bash", "-n", str(ROOT / "bench" / "check_export_compat.sh")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
