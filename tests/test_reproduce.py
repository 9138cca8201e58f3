"""Issue 12: the published commands' interface (flags, aliases, paths) and nothing reused that was made
differently (base model, task LoRA, gates, --max_seq_len, adapter keys, prediction settings)."""
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import lora_composition
import OPPU
import task_LoRA
import train_anchor_gate
import train_anchor_PEFT
from perpcs.errors import PerpcsError
from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import run_stage as run
from pipeline_fixture import TASK, adapter_digests, cli_error, file_digests

STAGE_SCRIPTS = [task_LoRA, train_anchor_PEFT, train_anchor_gate, lora_composition, OPPU]


# ---- flags of the published parsers ---------------------------------------------------------------------

@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda m: m.__name__)
def test_published_no_op_flags_are_accepted_with_a_note(script, capsys):
    args = script.parse_args(["--task_name", TASK, "--num_workers", "4", "--log_dir", "./logs", "--w_lora", "0.5",
                              "--w_gate", "x", "--model", "llama_7B", "--warmup_epochs", "1", "--gate_reset",
                              "--test_idx_dir", "./anchor_selection/history_avg/anchor_user_idx.pt",
                              "--device", "cuda:1"])
    out = capsys.readouterr().out
    for flag in ("--num_workers", "--log_dir", "--w_lora", "--w_gate", "--model", "--warmup_epochs", "--gate_reset",
                 "--test_idx_dir"):
        assert sum(line.startswith(f"note: {flag} ") for line in out.splitlines()) == 1, flag
    assert args.device == "cuda:1" and not [k for k in vars(args) if "no_op" in k]


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda m: m.__name__)
def test_abbreviated_flags_and_bad_devices_are_refused(script, capsys):
    for argv in (["--k_lis", "1"], ["--task_n", TASK], ["--device", "gpu"], ["--device", "cuda:x"]):
        with pytest.raises(SystemExit) as exc:
            script.parse_args(["--task_name", TASK] + argv)
        assert exc.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_oppu_release_spellings(capsys):
    args = OPPU.parse_args(["--task_name", TASK, "--k", "2", "--task_lora", "./ckpt/task", "--add_profile"])
    assert args.k_list == [2] and args.lora_ckpt == "./ckpt/task"
    out = capsys.readouterr().out
    assert "--k 2" in out and "--add_profile" in out
    assert OPPU.parse_args(["--task_name", TASK, "--k", "0"]).k_list == []   # no retrieval: kNP files only
    assert OPPU.parse_args(["--task_name", TASK]).k_list == [1, 2, 4]


def test_task_lora_takes_the_oppu_releases_k_spelling(capsys):
    """The OPPU release's task_LoRA.py takes --k K (0: no retrieval) and --add_profile; ours did not."""
    import cli_flags
    from perpcs.stages.config import TaskLoRAStage
    args = task_LoRA.parse_args(["--task_name", TASK, "--k", "0", "--add_profile"])
    assert args.k_list == [] and "--k 0" in capsys.readouterr().out
    assert cli_flags.config_from_args(TaskLoRAStage, args).generation.k_list == ()
    assert task_LoRA.parse_args(["--task_name", TASK, "--k", "4"]).k_list == [4]
    assert task_LoRA.parse_args(["--task_name", TASK]).k_list == [1, 2, 4]


def test_stage5_published_dir_flags_with_our_old_names_as_hidden_aliases(capsys):
    published = lora_composition.parse_args(["--task_name", TASK, "--gate_dir", "g", "--anchor_dir", "a"])
    ours = lora_composition.parse_args(["--task_name", TASK, "--gate_path", "g", "--anchor_path", "a"])
    assert (published.gate_dir, published.anchor_dir) == (ours.gate_dir, ours.anchor_dir) == ("g", "a")
    assert lora_composition.parse_args(["--task_name", TASK]).sample_top_p is None
    with pytest.raises(SystemExit):
        lora_composition.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--gate_dir" in help_text and "--anchor_dir" in help_text
    assert "--gate_path" not in help_text and "--anchor_path" not in help_text   # one spelling in the help


def test_default_layout_is_the_published_one():
    from perpcs.paths import default_dirs
    dirs = default_dirs(TASK)
    root = Path("output") / TASK
    assert (dirs["sharer_loras"], dirs["sharer_gates"], dirs["composition"], dirs["task_lora"]) == (
        root / "Anchor_PEFT/LoRA", root / "Anchor_PEFT/gate", root / "LoRA-Composition", root / "task-base_LLM")


def test_missing_published_index_resolves_to_stage_2s_with_one_line(tmp_path, monkeypatch, capsys):
    import perpcs.paths as paths
    written = tmp_path / "anchor_selection" / TASK / "anchor_user_idx.json"
    monkeypatch.setattr(paths, "default_sharer_index", lambda task_name: written)
    published = tmp_path / "anchor_selection/most_active/anchor_user_idx.pt"
    with pytest.raises(PerpcsError, match=f"writes {written}, which does not exist yet"):
        paths.resolve_sharer_index(published, TASK)
    written.parent.mkdir(parents=True)
    written.write_text("{}")
    assert paths.resolve_sharer_index(published, TASK) == written
    assert capsys.readouterr().out.count(f"using {written}") == 1
    # stage 2 run from anchor_selection/ by the published step 2 writes the .json beside where the .pt would be
    beside = written.with_name("anchor_user_idx.pt")
    assert paths.resolve_sharer_index(beside, TASK) == written
    with pytest.raises(PerpcsError, match=f"--anchor_idx_path .*typo.json: no such file; .* writes {written}"):
        paths.resolve_sharer_index(tmp_path / "typo.json", TASK)   # a path of one's own is never redirected
    assert paths.resolve_sharer_index(None, TASK) == written


def test_resolve_tokenizer_path(tmp_path):
    from perpcs.models.loading import resolve_tokenizer_path, smollm2_dir
    model = tmp_path / "Llama-2-7b"          # a Meta download: its tokenizer is the converted dir's
    model.mkdir()
    converted = tmp_path / "hf_converted"
    assert resolve_tokenizer_path(str(model), str(model), converted) == converted
    assert resolve_tokenizer_path(str(tmp_path / "Llama-2-7b" / ".." / "Llama-2-7b"), str(model), converted) == converted
    assert resolve_tokenizer_path(None, str(model), converted) == converted
    assert resolve_tokenizer_path("SmolLM2", "smollm2", converted) == smollm2_dir()
    other = tmp_path / "tok"
    assert resolve_tokenizer_path(str(other), str(model), converted) == other


def test_stage4_finds_sharers_under_the_published_parent(pipe, tmp_path, capsys):
    """Step 4 passes --anchor_path Anchor_PEFT while step 3 wrote Anchor_PEFT/LoRA/user_<id>."""
    parent = tmp_path / "Anchor_PEFT"
    shutil.copytree(pipe.anchor_peft, parent / "LoRA")
    out_dir = tmp_path / "gate"
    run(train_anchor_gate.main, pipe.gate_args(out_dir, anchor_path=parent), capsys)
    assert adapter_digests(out_dir) == adapter_digests(pipe.anchor_gate)


# ---- nothing reused that was made differently -----------------------------------------------------------

def _changed_copy(adapter_dir: Path, target: Path) -> Path:
    """A copy of an adapter with other weights (another task LoRA, same shapes)."""
    shutil.copytree(adapter_dir, target)
    weights = target / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    return target


def _other_model(model_dir: Path, target: Path) -> Path:
    """The tiny model under another config (loads the same; another model as far as a record can tell)."""
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_finished_sharers_with_a_nonexistent_model_path_fail_instead_of_passing(pipe, tmp_path, capsys):
    out_dir = tmp_path / "peft"
    shutil.copytree(pipe.anchor_peft, out_dir)
    err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir) + ["--llama_model_path", str(tmp_path / "nope")],
                    capsys)
    assert "model path not found" in err
    err = cli_error(train_anchor_gate.main, pipe.gate_args(tmp_path / "gate") + ["--llama_model_path",
                                                                                str(tmp_path / "nope")], capsys)
    assert "model path not found" in err


def test_sharers_of_another_task_lora_or_base_model_are_not_counted_as_done(pipe, tmp_path, capsys):
    out_dir = tmp_path / "peft"
    shutil.copytree(pipe.anchor_peft, out_dir)
    before = adapter_digests(out_dir)
    other_lora = _changed_copy(pipe.task_lora, tmp_path / "other_task_lora")
    err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir) + ["--lora_ckpt", str(other_lora)], capsys)
    assert "inputs.task_lora_sha256" in err and "--overwrite" in err           # the folder's run manifest
    (out_dir / "run_manifest.json").unlink()   # without it, each adapter's own record is checked
    err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir) + ["--lora_ckpt", str(other_lora)], capsys)
    assert "another task lora" in err and "--overwrite" in err
    other_model = _other_model(pipe.model, tmp_path / "other_model")
    err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir) + ["--llama_model_path", str(other_model)],
                    capsys)
    assert "another base model" in err
    first = pipe.sharer_ids()[0]
    (out_dir / f"user_{first}" / "source.json").unlink()
    err = cli_error(train_anchor_PEFT.main, pipe.sharer_args(out_dir), capsys)
    assert f"user_{first} has no record of the base model and task lora" in err
    assert {k: v for k, v in adapter_digests(out_dir).items() if not k.endswith("source.json")} == \
        {k: v for k, v in before.items() if not k.endswith("source.json")}   # nothing lost


def test_gates_without_a_record_or_of_another_base_model_are_refused(pipe, tmp_path, capsys):
    gate_dir = tmp_path / "gate"
    shutil.copytree(pipe.anchor_gate, gate_dir)
    before = adapter_digests(gate_dir)
    err = cli_error(train_anchor_gate.main, pipe.gate_args(gate_dir) + ["--llama_model_path",
                                                                        str(_other_model(pipe.model, tmp_path / "m"))],
                    capsys)
    assert "inputs.base_model" in err                                         # the folder's run manifest
    (gate_dir / "run_manifest.json").unlink()   # without it, each sharer's gates' own record is checked
    err = cli_error(train_anchor_gate.main, pipe.gate_args(gate_dir) + ["--llama_model_path",
                                                                        str(_other_model(pipe.model, tmp_path / "m2"))],
                    capsys)
    assert "another base model" in err
    first = pipe.sharer_ids()[0]
    (gate_dir / f"user_{first}" / "source.json").unlink()   # gates of an older version: unknown, not current
    err = cli_error(train_anchor_gate.main, pipe.gate_args(gate_dir), capsys)
    assert f"user_{first} has no record" in err and "--overwrite" in err
    assert {k: v for k, v in adapter_digests(gate_dir).items() if not k.endswith("source.json")} == \
        {k: v for k, v in before.items() if not k.endswith("source.json")}


@pytest.mark.parametrize("change", ["max_seq_len", "gates", "task_lora"])
def test_stage5_rerun_refuses_recipes_made_from_other_inputs(change, pipe, tmp_path, capsys):
    out_dir = tmp_path / "composition"
    shutil.copytree(pipe.composition, out_dir)
    before = file_digests(out_dir / "recipes")
    args = pipe.compose_args(out_dir)
    if change == "max_seq_len":
        args += ["--max_seq_len", "200"]
    elif change == "gates":
        gates = tmp_path / "gate"
        shutil.copytree(pipe.anchor_gate, gates)
        first = gates / f"user_{pipe.sharer_ids()[0]}" / "gates.safetensors"
        save_file({k: v + 1 for k, v in load_file(str(first)).items()}, str(first))
        args += ["--gate_dir", str(gates)]
    else:
        args += ["--lora_ckpt", str(_changed_copy(pipe.task_lora, tmp_path / "other_task_lora"))]
    err = cli_error(lora_composition.main, args, capsys)
    if change == "task_lora":   # the gates were trained on the other one: refused before any recipe is read
        assert "gates of sharer" in err and "another task lora" in err and "--lora_ckpt" in err
        assert file_digests(out_dir / "recipes") == before
        return
    expected = {"max_seq_len": "settings.max_seq_len 256 -> 200", "gates": f"inputs.gates.{pipe.sharer_ids()[0]}"}
    assert expected[change] in err and "--overwrite" in err                  # the folder's run manifest
    (out_dir / "run_manifest.json").unlink()   # without it, each recipe's own record is checked
    err = cli_error(lora_composition.main, args, capsys)
    expected = {"max_seq_len": "another max seq len", "gates": "another gates"}
    assert expected[change] in err and "recipes" in err and "--overwrite" in err
    assert file_digests(out_dir / "recipes") == before


def test_stage5_refuses_predictions_that_record_no_settings(pipe, tmp_path, capsys):
    out_dir = tmp_path / "composition"
    shutil.copytree(pipe.composition, out_dir)
    first = out_dir / "user_predictions" / f"user_{pipe.test_ids()[0]}.json"
    first.write_text(json.dumps(json.loads(first.read_text())["predictions"]))   # the older format
    err = cli_error(lora_composition.main, pipe.compose_args(out_dir), capsys)
    assert "records no generation settings" in err and str(first) in err


def test_oppu_resume_refuses_an_adapter_whose_keys_do_not_match(pipe, tmp_path, capsys):
    """Killed after saving, before predicting: the saved adapter is reloaded, but only if it fits exactly (peft's
    own load would keep the fresh init of the tensors the file lacks)."""
    out_dir = tmp_path / "oppu"
    run(OPPU.main, pipe.oppu_args(out_dir), capsys)
    uid = pipe.test_ids()[0]
    (out_dir / "user_predictions" / f"user_{uid}.json").unlink()
    weights = out_dir / "adapters" / f"user_{uid}" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights), metadata={"format": "pt"})
    err = cli_error(OPPU.main, pipe.oppu_args(out_dir), capsys)
    assert "1 missing tensors" in err and dropped.split(".")[0] in err and str(weights) in err
