"""scripts/ablation.py, perpcs/experiments/ablation.py and perpcs/evaluation/ablation_report.py (command
construction, resuming, scoring, plots, cost curves) and scripts/run_task.sh (syntax, and every flag it passes is
known to the script it calls).

No model runs here: a fake runner stands in for the stage scripts and writes the files they would write.
"""
import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from perpcs.evaluation.ablation_report import cost_curves, per_user_costs, plot_results
from perpcs.experiments.ablation import AblationConfig, Setting, check_plan, plan, run_ablation, run_steps, sweep_values
from perpcs.experiments.runner import load_script
from perpcs.errors import PerpcsError
from perpcs.data.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
TASK = get_task("movie_tagging")
GOLDS = [("1", "comedy"), ("2", "action"), ("3", "romance"), ("4", "classic")]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def flags(argv) -> dict:
    """{flag: value} of '--flag value' pairs (every flag the ablation passes takes one value)."""
    args = [str(a) for a in argv[2:]]
    return {args[i]: args[i + 1] for i in range(0, len(args), 2)}


def script(step) -> str:
    return Path(step.argv[1]).name


def index(k, strategy="cluster", ids=None):
    ids = ids if ids is not None else [f"s{i}" for i in range(k)]
    return {"task": TASK.name, "strategy": strategy, "k": k, "seed": 0, "indices": list(range(len(ids))),
            "user_ids": ids, "clusters": None}


@pytest.fixture
def config(tmp_path):
    write(tmp_path / "data/movie_tagging/test_100/golds.json",
          {"task": "LaMP_2M", "golds": [{"id": i, "output": o} for i, o in GOLDS]})
    write(tmp_path / "output/movie_tagging/task-base_LLM/adapter_model.safetensors", "x")
    return AblationConfig(TASK, output_root=tmp_path / "output", data_dir=tmp_path / "data",
                          anchor_root=tmp_path / "anchor_selection" / TASK.name, python="python",
                          extra=["--device", "cpu", "--max_seq_len", "512"], peft_extra=["--max_step", "3"],
                          compose_extra=["--recent_k", "16"])


def fake_runner(config, calls):
    """Does what each stage script would do to the file system, and records the command."""
    def run(argv):
        calls.append(argv)
        f = flags(argv)
        name = Path(argv[1]).name
        if name == "history_anchor.py":
            k = int(f["--k"])
            write(Path(f["--output_dir"]) / "anchor_user_idx.json", index(k, f["--strategy"]))
        elif name in ("train_anchor_PEFT.py", "train_anchor_gate.py"):
            ids = json.loads(Path(f["--anchor_idx_path"]).read_text())["user_ids"]
            for uid in ids:
                target = "adapter_model.safetensors" if name == "train_anchor_PEFT.py" else "gates.safetensors"
                write(Path(f["--output_dir"]) / f"user_{uid}" / target, "w")
        elif name == "lora_composition.py":
            out = Path(f["--output_dir"])
            right = int(f["--topk"])            # top-k n gets the first n golds right
            outputs = [g if i < right else "zzz" for i, (_, g) in enumerate(GOLDS)]
            write(out / "predictions/kNP.json",
                  {"task": "LaMP_2M", "golds": [{"id": i, "output": o} for (i, _), o in zip(GOLDS, outputs)]})
            write(out / "summary.json", {"mean": {"payload_bytes": 400.0, "recipe_bytes": 1000.0,
                                                  "assembly_seconds": 2.0}, "n_sharers": 4,
                                         "sharer_pool_bytes": 200000.0, "sharer_adapter_bytes": 50000.0})
        return 0
    return run


# ---- the commands -------------------------------------------------------------------------------

def test_sweeps_embed_with_the_pipelines_encoder(config):
    """The pipeline's sharers were chosen with DeBERTa (run_task.sh): a sweep's stage 2 must not fall back to the
    bundled MiniLM; an --encoder given in --anchor_extra wins."""
    _, steps = plan(config, sweep_values("k", ["10"]))
    assert "--encoder" not in steps[0].argv                      # no pipeline index: stage 2's own default
    write(config.pipeline_selection_dir / "anchor_user_idx.json", {**index(50), "encoder": "microsoft/deberta-v3-large"})
    _, steps = plan(config, sweep_values("k", ["10"]))
    assert flags(steps[0].argv)["--encoder"] == "microsoft/deberta-v3-large"
    config.anchor_extra = ["--encoder", "/my/encoder"]
    _, steps = plan(config, sweep_values("k", ["10"]))
    assert steps[0].argv.count("--encoder") == 1 and flags(steps[0].argv)["--encoder"] == "/my/encoder"


def test_k_sweep_reruns_stages_2_to_5_with_shared_sharer_dirs(config):
    points, steps = plan(config, sweep_values("k", ["10", "20"]))
    assert [(s, v) for s, v, _ in points] == [("k", 10), ("k", 20)]
    assert [script(s) for s in steps] == ["history_anchor.py", "train_anchor_PEFT.py", "train_anchor_gate.py",
                                          "lora_composition.py"] * 2
    root = config.output_root / "movie_tagging"
    anchors, sharers, gates, compose = (flags(s.argv) for s in steps[4:])   # k = 20
    assert anchors["--k"] == "20" and anchors["--strategy"] == "cluster"
    assert anchors["--candidate_path"] == str(config.data_dir / "movie_tagging/user_anchor_candidate.json")
    idx = str(root / "ablation/anchors/cluster-k20/anchor_user_idx.json")
    assert anchors["--output_dir"] == str(root / "ablation/anchors/cluster-k20")
    # stages 3 and 4 write to the pipeline's dirs (a sharer's adapter does not depend on k)
    assert sharers["--anchor_idx_path"] == idx and sharers["--output_dir"] == str(root / "Anchor_PEFT/LoRA")
    assert sharers["--max_step"] == "3" and sharers["--device"] == "cpu" and sharers["--max_seq_len"] == "512"
    assert sharers["--lora_ckpt"] == str(root / "task-base_LLM")
    assert gates["--anchor_path"] == str(root / "Anchor_PEFT/LoRA") and gates["--output_dir"] == str(root / "Anchor_PEFT/gate")
    assert "--max_step" not in gates     # stage-3-only flags stay there
    assert compose["--anchor_idx_path"] == idx and compose["--gate_dir"] == str(root / "Anchor_PEFT/gate")
    assert (compose["--topk"], compose["--share_ratio"], compose["--recent_k"]) == ("3", "1", "16")
    assert compose["--output_dir"] == str(root / "LoRA-Composition-k20")
    assert "--recent_k" not in sharers


def test_share_ratio_and_topk_reuse_the_pipeline_sharers(config):
    write(config.pipeline_selection_dir / "anchor_user_idx.json", index(50, ids=["a", "b"]))
    points, steps = plan(config, {"share_ratio": [0.5, 1.0], "topk": [1, 3]})
    # the pipeline setting (share ratio 1, top-k 3) appears in both sweeps but is planned once
    compose = [flags(s.argv) for s in steps if script(s) == "lora_composition.py"]
    root = config.output_root / "movie_tagging"
    assert [(c["--share_ratio"], c["--topk"], c["--output_dir"]) for c in compose] == [
        ("0.5", "3", str(root / "LoRA-Composition-share_ratio0.5")), ("1", "3", str(root / "LoRA-Composition")),
        ("1", "1", str(root / "LoRA-Composition-topk1"))]
    assert all(c["--anchor_idx_path"] == str(config.pipeline_selection_dir / "anchor_user_idx.json") for c in compose)
    anchor_steps = [s for s in steps if script(s) == "history_anchor.py"]
    assert len(anchor_steps) == 1 and anchor_steps[0].is_done()
    assert len(points) == 4


def test_pipeline_index_for_another_k_is_not_reused(config):
    write(config.pipeline_selection_dir / "anchor_user_idx.json", index(4))     # e.g. the demo's
    _, steps = plan(config, {"topk": [3]})
    anchors, *_, compose = (flags(s.argv) for s in steps)
    root = config.output_root / "movie_tagging"
    assert anchors["--output_dir"] == str(root / "ablation/anchors/cluster-k50")
    assert compose["--output_dir"] == str(root / "LoRA-Composition-cluster-k50")


def test_strategy_sweep_and_base_settings(config):
    config.base = Setting(k=20, topk=2)
    _, steps = plan(config, sweep_values("strategy", ["random", "most_active"]))
    anchors = [flags(s.argv) for s in steps if script(s) == "history_anchor.py"]
    assert [(a["--strategy"], a["--k"]) for a in anchors] == [("random", "20"), ("most_active", "20")]
    compose = [flags(s.argv)["--output_dir"] for s in steps if script(s) == "lora_composition.py"]
    assert [Path(c).name for c in compose] == ["LoRA-Composition-random-k20-topk2", "LoRA-Composition-most_active-k20-topk2"]


def test_every_command_passes_the_stage_parsers(config):
    _, steps = plan(config, sweep_values("all"))
    check_plan(steps)      # raises if a flag is unknown to the script's own parse_args
    config.extra = ["--no_such_flag", "1"]
    _, steps = plan(config, {"topk": [2]})
    with pytest.raises(PerpcsError, match=r"train_anchor_PEFT\.py rejects .*unrecognized arguments: --no_such_flag"):
        check_plan(steps)


@pytest.mark.parametrize("bad, message", [
    (dict(sweep="all", values=["1"]), "needs a single --sweep"),
    (dict(sweep="strategy", values=["kmeans"]), "not one of cluster"),
    (dict(sweep="share_ratio", values=["1.5"]), r"not in \(0, 1\]"),
    (dict(sweep="topk", values=["x"]), "not an integer"),
    (dict(sweep="depth", values=None), "unknown sweep"),
])
def test_bad_sweep_values(bad, message):
    with pytest.raises(PerpcsError, match=message):
        sweep_values(bad["sweep"], bad["values"])


def test_extra_flags_must_not_set_what_the_sweep_sets(config):
    config.compose_extra = ["--share_ratio=0.3"]
    with pytest.raises(PerpcsError, match="--compose_extra must not set --share_ratio"):
        run_ablation(config, {"topk": [1]}, dry_run=True)


# ---- resuming -----------------------------------------------------------------------------------

def test_finished_steps_are_skipped(config):
    _, steps = plan(config, {"k": [2]})
    anchors, sharers, gates, compose = steps
    assert not any(s.is_done() for s in steps)
    root = config.output_root / "movie_tagging"
    write(root / "ablation/anchors/cluster-k2/anchor_user_idx.json", index(2, ids=["a", "b"]))
    assert anchors.is_done() and not sharers.is_done()
    write(root / "Anchor_PEFT/LoRA/user_a/adapter_model.safetensors", "w")
    assert not sharers.is_done()           # user b is still missing: the stage runs (and trains only b)
    write(root / "Anchor_PEFT/LoRA/user_b/adapter_model.safetensors", "w")
    assert sharers.is_done() and not gates.is_done()
    for uid in "ab":
        write(root / f"Anchor_PEFT/gate/user_{uid}/gates.safetensors", "g")
    assert gates.is_done() and not compose.is_done()
    write(root / "LoRA-Composition-k2/predictions/kNP.json", "{}")
    write(root / "LoRA-Composition-k2/summary.json", "{}")
    assert not compose.is_done()           # stage 5 always runs: it resumes and checks settings itself


def test_an_index_for_another_setting_is_an_error(config):
    write(config.output_root / "movie_tagging/ablation/anchors/cluster-k10/anchor_user_idx.json", index(7))
    _, steps = plan(config, {"k": [10]})
    with pytest.raises(PerpcsError, match="written for k 7 / cluster, but this run needs k 10"):
        steps[0].is_done()


def test_run_steps_runs_only_what_is_missing(config, capsys):
    calls = []
    _, steps = plan(config, {"k": [2, 3]})
    write(config.output_root / "movie_tagging/ablation/anchors/cluster-k2/anchor_user_idx.json",
          index(2, ids=["s0", "s1"]))
    ran = run_steps(steps, runner=fake_runner(config, calls))
    assert capsys.readouterr().out.count("# done, skipped") == 1     # the k 2 index was there
    assert [Path(c[1]).name for c in calls] == ["train_anchor_PEFT.py", "train_anchor_gate.py",
                                                "lora_composition.py", "history_anchor.py",
                                                "train_anchor_PEFT.py", "train_anchor_gate.py",
                                                "lora_composition.py"]
    assert len(ran) == 7
    calls.clear()
    run_steps(steps, runner=fake_runner(config, calls))
    assert [Path(c[1]).name for c in calls] == ["lora_composition.py", "lora_composition.py"]   # resume themselves
    assert capsys.readouterr().out.count("# done, skipped") == 6


def test_dry_run_prints_and_runs_nothing(config, capsys):
    calls = []
    assert run_ablation(config, {"topk": [1]}, dry_run=True, runner=fake_runner(config, calls)) is None
    assert calls == []
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[-1].startswith("python ") and "--topk 1" in out[-1]


def test_a_failing_stage_stops_the_ablation(config):
    _, steps = plan(config, {"k": [2]})
    with pytest.raises(PerpcsError, match="anchors stopped with exit code 3"):
        run_steps(steps, runner=lambda argv: 3)


def test_cluster_runs_start_from_the_pipeline_embeddings(config):
    for name in ("user_history_emb.npy", "user_history_emb.json"):
        write(config.pipeline_selection_dir / name, name)
    _, steps = plan(config, {"k": [5]})
    note = steps[0].prepare()
    target = config.output_root / "movie_tagging/ablation/anchors/cluster-k5"
    assert "copied the candidate embeddings" in note
    assert (target / "user_history_emb.npy").read_text() == "user_history_emb.npy"
    assert steps[0].prepare() is None       # already there: left alone


# ---- results, costs, plots ----------------------------------------------------------------------

def test_full_ablation_with_fake_stages_scores_and_plots(config):
    calls = []
    results = run_ablation(config, {"topk": [1, 3]}, runner=fake_runner(config, calls), max_users=10)
    points = results["sweeps"]["topk"]
    # the fake stage 5 gets the first top-k golds right: accuracy k / 4
    assert [(p["value"], p["scores"]["kNP"]["accuracy"]) for p in points] == [(1, 0.25), (3, 0.75)]
    # no pipeline index: the pipeline setting (top-k 3) got its own dirs, and the costs come from there
    assert Path(points[1]["run_dir"]).name == "LoRA-Composition-cluster-k50"
    storage = results["costs"]["storage_bytes"]
    assert storage["Per-Pcs (sharer ids + weights)"][-1] == 10 * 400.0                   # the payload ...
    assert storage["Per-Pcs recipe files (with bookkeeping)"][-1] == 10 * 1000.0        # ... beside the files
    # no OPPU run: no OPPU curve (not the sharers' adapter size in its place), and results.json says why
    assert not any("OPPU" in label for label in storage) and "OPPU (training)" not in results["costs"]["seconds"]
    assert any(m.startswith("OPPU (one LoRA per user): no complete adapter under") for m in results["costs"]["missing"])
    saved = json.loads((config.ablation_root / "results.json").read_text())
    assert saved["sweeps"]["topk"] == points
    assert sorted(Path(p).name for p in saved["plots"]) == ["costs.png", "topk.png"]
    # a second sweep is added to the same results.json, the first one is kept
    run_ablation(config, {"share_ratio": [0.5]}, runner=fake_runner(config, calls), max_users=10)
    saved = json.loads((config.ablation_root / "results.json").read_text())
    assert set(saved["sweeps"]) == {"topk", "share_ratio"}


def test_costs_come_from_the_base_setting_of_the_run(config):
    """With --base_k 4 the costs are the base setting's composition (LoRA-Composition-...k4), not the pipeline's."""
    from dataclasses import replace as dc_replace
    config.base = dc_replace(config.base, k=4)
    calls = []
    results = run_ablation(config, {"topk": [1, 3]}, runner=fake_runner(config, calls), max_users=10)
    base_dir = config.composition_dir(config.base)
    assert "k4" in base_dir.name and (base_dir / "summary.json").is_file()
    assert results["costs"]["storage_bytes"]["Per-Pcs (sharer ids + weights)"][-1] == 10 * 400.0


def test_partial_sweep_plots_what_exists_and_names_what_is_missing(config):
    """A k sweep without the base setting (k 50): costs.png draws Per-Pcs from the swept run that exists (k 10)
    beside OPPU and names the base setting's curves as missing; the k plot keeps the k 20 point that has no
    results, marked and named. Checked on what the figures really draw (<plot>.plotted.json), not on pixels."""
    root = config.task_root
    write(root / "OPPU/adapters/user_u1/adapter_model.safetensors", "x" * 900)
    write(root / "OPPU/adapters/user_u1/adapter_config.json", "x" * 100)
    write(root / "OPPU/users_log.jsonl", json.dumps({"user_id": "u1", "train_seconds": 30.0}) + "\n")
    calls = []
    fake = fake_runner(config, calls)

    def runner(argv):   # stage 5 of k 20 leaves nothing behind (say, it was stopped and not rerun yet)
        if Path(argv[1]).name == "lora_composition.py" and flags(argv)["--output_dir"].endswith("-k20"):
            calls.append(argv)
            return 0
        return fake(argv)

    results = run_ablation(config, {"k": [10, 20]}, runner=runner, max_users=10)
    for name in ("costs", "k"):   # kept for a look at the figures: pytest --basetemp=DIR
        assert (config.ablation_root / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (config.composition_dir(config.base) / "summary.json").exists()     # the base setting never ran
    assert "Per-Pcs (sharer ids + weights) [k10]" in results["costs"]["storage_bytes"]
    costs_plot = json.loads((config.ablation_root / "costs.plotted.json").read_text())
    assert [panel["ylabel"] for panel in costs_plot["panels"]] == ["storage (KB)", "time (minutes)"]
    storage, seconds = (panel["lines"] for panel in costs_plot["panels"])
    assert storage["Per-Pcs (sharer ids + weights) [k10]"][-1] == [10.0, 10 * 400.0 / 1024]
    assert storage["Per-Pcs + sharer LoRAs [k10]"][-1] == [10.0, (200000.0 + 10 * 400.0) / 1024]
    assert storage["OPPU (one LoRA per user)"][-1] == [10.0, 10 * 1000.0 / 1024]
    assert seconds["Per-Pcs (assembly) [k10]"][0] == [1.0, 2.0 / 60]
    assert set(seconds) == {"Per-Pcs (assembly) [k10]", "OPPU (training)"}   # no sharer logs: no '+ training'
    base_dir = config.composition_dir(config.base)
    named = {m.split(":")[0]: m for m in costs_plot["missing"]}
    assert f"no {base_dir / 'summary.json'}" in named["Per-Pcs (sharer ids + weights)"]
    assert "drawn instead for the swept setting k10" in named["Per-Pcs (sharer ids + weights)"]
    assert "Per-Pcs + sharer training" in named
    assert any("not drawn: Per-Pcs (sharer ids + weights)" in note for note in costs_plot["notes"])
    assert "swept settings" in costs_plot["title"]
    assert results["costs"]["missing"] == costs_plot["missing"]
    k_plot = json.loads((config.ablation_root / "k.plotted.json").read_text())
    panel = k_plot["panels"][0]
    assert panel["lines"]["kNP"] == [[10.0, 0.75], [20.0, None]]     # the k 20 point is a gap, not dropped ...
    assert panel["missing_marks"] == [20.0]                           # ... and marked
    assert len(k_plot["missing"]) == 1 and k_plot["missing"][0].startswith("number of sharers 20: no ")
    assert "-k20" in k_plot["missing"][0]
    assert results["sweeps"]["k"][1]["missing"] == f"no {config.composition_dir(Setting(k=20)) / 'predictions'}"
    assert "missing" not in results["sweeps"]["k"][0]


def test_per_user_costs_and_curves_from_fake_logs(tmp_path):
    root = tmp_path / "movie_tagging"
    write(root / "LoRA-Composition/summary.json", {"mean": {"payload_bytes": 700.0, "recipe_bytes": 3000.0,
                                                      "assembly_seconds": 4.0},
                                             "n_sharers": 5, "sharer_pool_bytes": 400000.0})
    write(root / "OPPU/users_log.jsonl", "\n".join(json.dumps(r) for r in [
        {"user_id": "u1", "train_seconds": 100.0}, {"user_id": "u2", "train_seconds": 300.0},
        {"user_id": "u1", "train_seconds": 0.0}]) + "\n")     # u1 resumed: its adapter existed
    # OPPU's storage: the adapter files peft loads, mean over the users with a complete adapter
    write(root / "OPPU/adapters/user_u1/adapter_model.safetensors", "x" * 600)
    write(root / "OPPU/adapters/user_u1/adapter_config.json", "x" * 400)
    write(root / "OPPU/adapters/user_u1/README.md", "x" * 5000)                 # peft's model card: not counted
    write(root / "OPPU/adapters/user_u2/adapter_model.safetensors", "x" * 1500)
    write(root / "OPPU/adapters/user_u2/adapter_config.json", "x" * 500)
    write(root / "OPPU/adapters/user_u3/adapter_model.safetensors", "x" * 9999)  # unfinished: no config
    write(root / "Anchor_PEFT/LoRA/users_log.jsonl", json.dumps({"user_id": "s", "seconds": 50.0}) + "\n")
    write(root / "Anchor_PEFT/gate/users_log.jsonl", json.dumps({"user_id": "s", "seconds": 30.0}) + "\n")
    costs = per_user_costs(root)
    assert costs["oppu_train_seconds"] == 200.0          # mean of 100 and 300, the resume's 0 ignored
    assert costs["oppu_adapter_bytes"] == (1000 + 2000) / 2 and costs["oppu_users"] == 2
    assert costs["sharer_pool_bytes"] == 400000.0 and costs["sharer_seconds"] == 5 * 80.0
    assert costs["missing"] == {}
    curves = cost_curves(costs, [1, 10])
    assert curves["storage_bytes"]["Per-Pcs (sharer ids + weights)"] == [700.0, 7000.0]
    assert curves["storage_bytes"]["Per-Pcs recipe files (with bookkeeping)"] == [3000.0, 30000.0]
    assert curves["storage_bytes"]["OPPU (one LoRA per user)"] == [1500.0, 15000.0]
    assert curves["storage_bytes"]["Per-Pcs + sharer LoRAs"] == [400700.0, 407000.0]
    assert curves["seconds"]["Per-Pcs (assembly)"] == [4.0, 40.0]
    assert curves["seconds"]["OPPU (training)"] == [200.0, 2000.0]
    assert curves["seconds"]["Per-Pcs + sharer training"] == [404.0, 440.0]
    assert curves["missing"] == []


def test_costs_without_oppu_show_no_oppu_figure(tmp_path):
    """OPPU never ran: its curves are left out and named as missing; the sharers' adapter size (in the summary)
    does not stand in for OPPU's."""
    root = tmp_path / "movie_tagging"
    write(root / "LoRA-Composition/summary.json", {"mean": {"payload_bytes": 8.0, "recipe_bytes": 10.0,
                                                      "assembly_seconds": 1.0},
                                             "n_sharers": 2, "sharer_pool_bytes": 1000.0,
                                             "sharer_adapter_bytes": 500.0})
    costs = per_user_costs(root)
    assert costs["oppu_adapter_bytes"] is None and costs["oppu_train_seconds"] is None
    assert "OPPU/adapters" in costs["missing"]["oppu_adapter_bytes"]
    curves = cost_curves(costs, [2])
    assert set(curves["storage_bytes"]) == {"Per-Pcs (sharer ids + weights)", "Per-Pcs + sharer LoRAs",
                                            "Per-Pcs recipe files (with bookkeeping)"}
    assert "OPPU (training)" not in curves["seconds"] and "Per-Pcs + sharer training" not in curves["seconds"]
    assert [m.split(":")[0] for m in curves["missing"]] == ["OPPU (one LoRA per user)", "Per-Pcs + sharer training",
                                                          "OPPU (training)"]
    assert plot_results(TASK, {"costs": curves}, tmp_path / "plots")[0].name == "costs.png"


def test_costs_without_per_pcs_show_no_per_pcs_figure(tmp_path):
    """Stage 5 never ran (or left an old summary without the payload): OPPU is drawn alone, Per-Pcs is named as
    missing, and no OPPU figure is drawn as Per-Pcs's."""
    root = tmp_path / "movie_tagging"
    write(root / "OPPU/adapters/user_u1/adapter_model.safetensors", "x" * 900)
    write(root / "OPPU/adapters/user_u1/adapter_config.json", "x" * 100)
    write(root / "OPPU/users_log.jsonl", json.dumps({"user_id": "u1", "train_seconds": 30.0}) + "\n")
    for summary in (None, {"mean": {"recipe_bytes": 6000.0, "adapter_bytes": 80000.0}, "n_sharers": 4}):
        if summary is not None:
            write(root / "LoRA-Composition/summary.json", summary)
        costs = per_user_costs(root)
        assert costs["payload_bytes"] is None and costs["sharer_pool_bytes"] is None
        curves = cost_curves(costs, [1, 3])
        assert curves["storage_bytes"]["OPPU (one LoRA per user)"] == [1000.0, 3000.0]
        assert set(curves["seconds"]) == {"OPPU (training)"}
        per_pcs_curves = [label for label in curves["storage_bytes"] if "Per-Pcs" in label]
        assert per_pcs_curves == ([] if summary is None else ["Per-Pcs recipe files (with bookkeeping)"])
        reason = "no " if summary is None else "written by an older version"
        assert any(m.startswith("Per-Pcs (sharer ids + weights):") and reason in m for m in curves["missing"])


def test_plots_from_a_fake_results_json(tmp_path):
    scores = lambda acc: {"kNP": {"accuracy": acc, "f1": acc / 2}, "k1-profile": {"accuracy": acc + 0.1,
                                                                                "f1": acc / 3}}
    results = {"sweeps": {
        "k": [{"value": 10, "scores": scores(0.3)}, {"value": 50, "scores": scores(0.4)}],
        "strategy": [{"value": "cluster", "scores": scores(0.4)}, {"value": "random", "scores": {}}]},
        "costs": cost_curves({"payload_bytes": 40.0, "recipe_bytes": 100.0, "sharer_pool_bytes": None,
                              "oppu_adapter_bytes": 9000.0,
                              "assembly_seconds": 2.0, "sharer_seconds": None, "oppu_train_seconds": 60.0},
                             [1, 50, 100])}
    paths = plot_results(TASK, results, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["costs.png", "k.png", "strategy.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert not list((tmp_path / "plots").glob(".*"))     # no temporary files left behind


def test_script_dry_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/ablation.py"), "--task_name", "LaMP_2M", "--sweep", "share_ratio",
         "--values", "0.5", "--dry_run", "--output_root", str(tmp_path / "out"), "--anchor_dir",
         str(tmp_path / "none"), "--extra", "--device cpu --max_seq_len 512", "--python", "py"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("py ")]
    assert [c.split()[1] for c in commands] == ["anchor_selection/history_anchor.py", "train_anchor_PEFT.py",
                                                "train_anchor_gate.py", "lora_composition.py"]
    assert "--share_ratio 0.5" in commands[-1] and "--device cpu --max_seq_len 512" in commands[-1]
    assert not (tmp_path / "out").exists()     # a dry run writes nothing


# ---- scripts/run_task.sh ------------------------------------------------------------------------

RUN_TASK = REPO / "scripts" / "run_task.sh"
STAGE_ORDER = ["data/prepare_lamp.py", "data/gen_profile.py", "task_LoRA.py", "anchor_selection/history_anchor.py",
               "train_anchor_PEFT.py", "train_anchor_gate.py", "lora_composition.py", "OPPU.py"]


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def parse_with_script(path: Path, args: list):
    """The script's own parser applied to ``args``; a script without parse_args(argv) (its main builds the
    parser) is run up to its parse_args call."""
    module = load_script(path)
    if hasattr(module, "parse_args"):
        return module.parse_args(args)
    original = argparse.ArgumentParser.parse_args

    def capture(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    with mock.patch.object(sys, "argv", [str(path)] + args), \
            mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        with pytest.raises(_Parsed) as parsed:
            module.main()
    return parsed.value.namespace


def fake_python(path: Path, body: str = "") -> Path:
    """An interpreter for run_task.sh that runs ``body`` (sh) for each step, and is the real Python for the
    script's own task lookup (``-c``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then exec {shlex.quote(sys.executable)} "$@"; fi\n{body}\n')
    path.chmod(0o755)
    return path


def run_task_commands(tmp_path, env_extra=None, dry_run=True, task="movie_tagging"):
    """Run a copy of run_task.sh in an empty tree (so no step is done; perpcs/ linked in for the task lookup, and
    the default interpreter ``python`` on PATH) and return the printed commands as (working dir relative to the
    repo, argv)."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    (tmp_path / "scripts" / "run_task.sh").write_text(RUN_TASK.read_text())
    if not (tmp_path / "perpcs").exists():
        (tmp_path / "perpcs").symlink_to(REPO / "perpcs")
    fake_python(tmp_path / "bin" / "python")
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "LAMP_DIR": "/raw/lamp", **(env_extra or {})}
    if dry_run:
        env["DRY_RUN"] = "1"
    result = subprocess.run(["bash", str(tmp_path / "scripts/run_task.sh"), task], env=env,
                            capture_output=True, text=True, timeout=60)
    commands = []
    for line in result.stdout.splitlines():
        if line.startswith("+ (cd "):
            directory, rest = line[len("+ (cd "):].split(" && ", 1)
            commands.append((directory, shlex.split(rest.rstrip(")"))))
        elif line.startswith("+ "):
            commands.append((".", shlex.split(line[2:])))
    return result, commands


def test_run_task_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(RUN_TASK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_run_task_flags_exist_in_each_scripts_parser(tmp_path):
    result, commands = run_task_commands(tmp_path)
    assert result.returncode == 0, result.stderr
    scripts = [str(Path(d) / argv[1]) if d != "." else argv[1] for d, argv in commands]
    stages = [s for s in scripts if not s.startswith("eval/")]
    assert stages == STAGE_ORDER
    assert scripts.count("eval/eval_task.py") == 24 and scripts[-1] == "eval/eval_all.py"
    for script_name, (directory, argv) in zip(scripts, commands):
        assert argv[0] == "python"
        parse_with_script(REPO / script_name, argv[2:])   # SystemExit (argparse) if a flag is unknown
    by_script = dict(zip(scripts, (argv for _, argv in commands)))
    assert by_script["anchor_selection/history_anchor.py"][2:] == [
        "--candidate_path", "../data/movie_tagging/user_anchor_candidate.json", "--task_name", "movie_tagging",
        "--k", "50", "--device", "cuda", "--encoder", "microsoft/deberta-v3-large"]
    composition = parse_with_script(REPO / "lora_composition.py", by_script["lora_composition.py"][2:])
    assert (composition.topk, composition.share_ratio, composition.agg_temperature) == (3, 1.0, 1.0)
    assert composition.lora_ckpt == "./output/movie_tagging/task-base_LLM/lora_ckpt.pt"
    assert composition.llama_model_path == "./llama_download/Llama-2-7b" and composition.device == "cuda"
    gates = parse_with_script(REPO / "train_anchor_gate.py", by_script["train_anchor_gate.py"][2:])
    assert gates.anchor_path == "./output/movie_tagging/Anchor_PEFT"
    prepare = parse_with_script(REPO / "data/prepare_lamp.py", by_script["data/prepare_lamp.py"][2:])
    assert prepare.lamp_dir == "/raw/lamp" and prepare.out_dir == "data"


def test_run_task_variables_reach_the_commands(tmp_path):
    py = str(fake_python(tmp_path / "opt" / "py"))
    _, commands = run_task_commands(tmp_path, {"PY": py, "LLAMA": "/m/llama", "DEVICE": "cpu"})
    task_lora = next(argv for _, argv in commands if argv[1] == "task_LoRA.py")
    assert task_lora == [py, "task_LoRA.py", "--task_name", "movie_tagging", "--llama_model_path",
                         "/m/llama", "--device", "cpu"]


@pytest.mark.parametrize("spelling", ["LaMP_3", "LaMP-3", "lamp3", "product_rating"])
def test_run_task_takes_every_task_spelling_of_the_python_tools(tmp_path, spelling):
    result, commands = run_task_commands(tmp_path, task=spelling)
    assert result.returncode == 0, result.stderr
    task_names = [argv[argv.index("--task_name") + 1] for _, argv in commands if "--task_name" in argv]
    assert len(task_names) == len(commands) - 1 and set(task_names) == {"product_rating"}   # eval_all: no task
    assert "data/product_rating/user_anchor_candidate.json" in " ".join(commands[3][1])


def test_run_task_refuses_an_unknown_task_with_the_registrys_message(tmp_path):
    result, commands = run_task_commands(tmp_path, task="LaMP_9")
    assert result.returncode == 2 and commands == [] and "unknown task 'LaMP_9'" in result.stderr
    result, _ = run_task_commands(tmp_path, task="LaMP_2")
    assert result.returncode == 2 and "ambiguous" in result.stderr


def test_run_task_passes_extra_flags_and_sharer_k(tmp_path):
    result, commands = run_task_commands(tmp_path, {"EXTRA_OPPU": "--epochs 3 --lr 1e-4", "SHARER_K": "7",
                                                    "EXTRA_TASK_LORA": "--max_step 2"})
    assert result.returncode == 0, result.stderr
    by_script = {argv[1]: argv for _, argv in commands}
    assert by_script["OPPU.py"][-4:] == ["--epochs", "3", "--lr", "1e-4"]
    assert by_script["task_LoRA.py"][-2:] == ["--max_step", "2"]
    step_2 = by_script["history_anchor.py"]
    assert step_2[step_2.index("--k") + 1] == "7"
    assert "--epochs" not in by_script["lora_composition.py"] and "--max_step" not in by_script["OPPU.py"]
    oppu = parse_with_script(REPO / "OPPU.py", by_script["OPPU.py"][2:])
    assert (oppu.epochs, oppu.lr) == (3, 1e-4)


def test_run_task_encoder_is_the_papers_unless_encoder_says_otherwise(tmp_path):
    def step_2(env_extra=None):
        result, commands = run_task_commands(tmp_path, env_extra)
        assert result.returncode == 0, result.stderr
        argv = next(argv for _, argv in commands if argv[1] == "history_anchor.py")
        assert argv.count("--encoder") == 1
        return argv[argv.index("--encoder") + 1]

    assert step_2() == "microsoft/deberta-v3-large"
    assert step_2({"ENCODER": "sentence-transformers/all-MiniLM-L6-v2"}) == "sentence-transformers/all-MiniLM-L6-v2"
    # A directory relative to the repository root still names it from inside anchor_selection/.
    (tmp_path / "encoders" / "mine").mkdir(parents=True)
    assert step_2({"ENCODER": "encoders/mine"}) == str(tmp_path / "encoders" / "mine")
    assert "ENCODER" in RUN_TASK.read_text().split("set -euo pipefail")[0]     # documented in the header


def test_run_task_skips_finished_steps_and_runs_step_2_in_anchor_selection(tmp_path):
    """A real (not dry) run with a fake interpreter that logs its working dir and arguments."""
    log = tmp_path / "calls.log"
    fake_py = fake_python(tmp_path / "fakepy", f'echo "$(basename "$PWD") $*" >> {log}')
    (tmp_path / "anchor_selection").mkdir()
    out = tmp_path / "output/movie_tagging"
    for done in ["task-base_LLM/predictions/k4-profile.json", "task-base_LLM/predictions/kNP.json",
                 "LoRA-Composition/summary.json", "OPPU/predictions/k4-profile.json"]:
        write(out / done, "{}")
    write(tmp_path / "data/movie_tagging/test_100/user_test_100.json", "[]")
    result, _ = run_task_commands(tmp_path, {"PY": str(fake_py)}, dry_run=False)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    ran = [(c.split()[0], c.split()[1]) for c in calls]
    assert ran == [(tmp_path.name, "data/gen_profile.py"), ("anchor_selection", "history_anchor.py"),
                   (tmp_path.name, "train_anchor_PEFT.py"), (tmp_path.name, "train_anchor_gate.py"),
                   (tmp_path.name, "lora_composition.py"), (tmp_path.name, "OPPU.py"),
                   (tmp_path.name, "eval/eval_task.py"), (tmp_path.name, "eval/eval_task.py"),
                   (tmp_path.name, "eval/eval_task.py"), (tmp_path.name, "eval/eval_all.py")]
    assert result.stdout.count("skipped") == 2     # data, step 1 (the per-user stages resume themselves)


def test_run_task_without_data_or_lamp_dir_stops(tmp_path):
    result, commands = run_task_commands(tmp_path, {"LAMP_DIR": ""}, dry_run=False)
    assert result.returncode == 2 and "set LAMP_DIR" in result.stderr and commands == []
