"""Beyond the paper (docs/method.md section 7.1): score calibration (lora_composition.py --score_calibration) and
the routing objective of the gates (train_anchor_gate.py --gate_objective routing), with the published defaults
unchanged."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from pipeline_fixture import one_thread, pipe  # noqa: F401  (fixtures)
from pipeline_fixture import cli_error, file_digest, file_digests, run_stage

from perpcs.method.calibration import (SUMMARY_FILE, Calibration, example_summaries, fit_routing_gates,
                                       split_held_out)
from perpcs.method.composition import ComposeSettings
from perpcs.method.gates import gate_summary, answer_positions, answer_predicting_mask, normalised_gates


# ---- the core ------------------------------------------------------------------------------------------------

def tokenized(ids, n_answer):
    from perpcs.engine.training import Tokenized
    return Tokenized(list(ids), [-100] * (len(ids) - n_answer) + list(ids[-n_answer:]), "t")


def test_example_summaries_are_the_assemblys_summaries_example_by_example(tiny_model_dir, one_thread):
    """Each example's summary is gate_summary of that example alone at the piece's input, and the mean of a
    batch's examples' summaries is the batch's summary, as the assembly computes it."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    piece = "model.layers.1.self_attn.o_proj"
    rows = [tokenized(range(10, 22), 3), tokenized(range(40, 47), 2), tokenized(range(90, 99), 4)]
    got = example_summaries(model, [piece], rows, 0, "cpu", batch_size=2)[piece]
    assert got.shape == (3, model.config.hidden_size)
    from perpcs.engine.training import collate
    seen = {}
    handle = dict(model.named_modules())[piece].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    batch = collate(rows, 0)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    mask = answer_predicting_mask(batch["labels"])
    batch_summary = gate_summary(seen["x"], answer_positions(mask))
    assert torch.allclose(got.mean(0), batch_summary, atol=1e-5)
    for i in range(3):
        alone = gate_summary(seen["x"][i:i + 1], answer_positions(mask[i:i + 1]))
        assert torch.allclose(got[i], alone, atol=1e-5)


# ---- (a) center: a shift common to every user is removed ----------------------------------------------------

def test_center_removes_a_shift_common_to_every_user_and_ranks_by_the_user_specific_part():
    torch.manual_seed(0)
    d, S = 32, 3
    raw = torch.randn(S, d)
    gates = normalised_gates([{"p": g} for g in raw], "p")
    # each reference user's own deviation, along its own sharer's gate (the sharer is the user whose data it is)
    user_parts = 0.1 * gates + 0.02 * torch.randn(S, d)
    shift = 10 * F.layer_norm(raw[0], (d,))       # a large component every user shares, aligned with sharer 0's gate
    means = [{"p": shift + u} for u in user_parts]
    target = shift + user_parts[2] * 1.5          # a target user like sharer 2
    published = (target @ gates.T) / d ** 0.5
    assert int(published.argmax()) == 0           # the shared shift decides without calibration
    center = Calibration("center", means, {"p": gates})
    centred = center.scores("p", target, gates)
    assert not torch.allclose(centred, published)
    reference = torch.stack([m["p"] for m in means]).mean(0)
    assert torch.allclose(centred, (target - reference) @ gates.T / d ** 0.5, atol=1e-5)
    assert int(centred.argmax()) == 2             # the user-specific part decides
    # the same users without the shift: the same centred scores (the shift is gone entirely)
    plain = Calibration("center", [{"p": u} for u in user_parts], {"p": gates})
    assert torch.allclose(plain.scores("p", user_parts[2] * 1.5, gates), centred, atol=1e-4)
    z = Calibration("zscore", means, {"p": gates})
    spread = torch.stack([(u - user_parts.mean(0)) @ gates.T / d ** 0.5 for u in user_parts]).std(0)
    assert torch.allclose(z.scores("p", target, gates), centred / spread, atol=1e-4)


def test_the_composer_chooses_from_calibrated_scores():
    from perpcs.method.composition import Composer
    torch.manual_seed(1)
    d, S = 16, 3
    gates = normalised_gates([{"p": g} for g in torch.randn(S, d)], "p")
    shift = 10 * gates[1] / d ** 0.5
    parts = torch.randn(S, d) * 0.1

    class Pool:
        pieces, G, scaling = ["p"], {"p": gates}, 1.0
        A = {"p": torch.zeros(S, 2, d)}
        B = {"p": torch.zeros(S, d, 2)}

        def __len__(self):
            return S
    composer = Composer(Pool(), ComposeSettings(topk=1))
    composer.start_user(0)
    composer._decide("p", shift + parts[0] * 3)
    assert int(composer.weight_sum["p"].argmax()) == 1       # published: the shift's sharer
    composer.calibration = Calibration("center", [{"p": shift + u} for u in parts], {"p": gates})
    composer.start_user(0)
    composer._decide("p", shift + parts[0] * 3)
    chosen = int(composer.weight_sum["p"].argmax())
    assert chosen == int(((parts[0] - parts.mean(0)) @ gates.T).argmax())


# ---- (b) routing gates rank each sharer's own held-out examples first ----------------------------------------

def test_routing_gates_rank_each_sharers_own_held_out_batches_first(tiny_model_dir, one_thread):
    """Three sharers write from different vocabularies; the summaries come from the tiny Llama's pieces. Routing
    gates put the owner first on held-out batches, at every piece."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pieces = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj", "o_proj")]
    gen = torch.Generator().manual_seed(0)
    summaries = []
    for s in range(3):
        vocab = torch.arange(20 + 150 * s, 20 + 150 * s + 10)   # each sharer's own few words: its topic
        rows = [tokenized([1] + vocab[torch.randint(0, 10, (int(n),), generator=gen)].tolist(), 3)
                for n in torch.randint(8, 16, (20,), generator=gen)]
        summaries.append(example_summaries(model, pieces, rows, 0, "cpu", batch_size=10))
    gates, report = fit_routing_gates(summaries, steps=60, lr=0.05, temperature=0.1, batch_size=4, seed=0)
    assert set(gates) == set(pieces) and gates[pieces[0]].shape == (3, model.config.hidden_size)
    assert report["held_out_top1"] == 1.0 and report["train_top1"] == 1.0
    tr, held = split_held_out(20, 0)
    assert held and not set(tr) & set(held)
    # the report's held-out accuracy is the score function's: recompute it for one piece by hand
    p = pieces[-1]
    normed = normalised_gates([{"g": g} for g in gates[p]], "g")
    for owner, summ in enumerate(summaries):
        _, held = split_held_out(20, owner)
        scores = summ[p][held].mean(0) @ normed.T / normed.shape[1] ** 0.5
        assert int(scores.argmax()) == owner


def test_routing_needs_two_sharers():
    from perpcs.errors import PerpcsError
    with pytest.raises(PerpcsError, match="at least 2 sharers"):
        fit_routing_gates([{"p": torch.randn(4, 8)}], 1, 0.1, 0.1, 2, 0)


# ---- (c) the published defaults are unchanged -----------------------------------------------------------------

def test_default_settings_record_what_they_recorded_before():
    assert list(ComposeSettings().recorded()) == ["topk", "agg_temperature", "share_ratio", "epochs", "batch_size",
                                                  "recent_k", "seed", "sample", "sample_topk",
                                                  "sample_temperature", "sample_top_p"]
    assert ComposeSettings(score_calibration="center").recorded()["score_calibration"] == "center"


def test_published_runs_record_no_new_keys(pipe):
    manifest = json.loads((pipe.anchor_gate / "run_manifest.json").read_text())
    assert set(manifest["settings"]) == {"train", "recent_k"}
    source = json.loads((pipe.anchor_gate / f"user_{pipe.sharer_ids()[0]}" / "source.json").read_text())
    assert "gate_objective" not in source and "summary_sha256" in source
    recipe = json.loads(next((pipe.composition / "recipes").iterdir()).read_text())
    assert "score_calibration" not in recipe["settings"]
    assert not {"gate_objective", "reference_summaries"} & set(recipe["inputs"])
    comp = json.loads((pipe.composition / "run_manifest.json").read_text())
    assert "score_calibration" not in comp["settings"]["compose"]


def test_an_older_gates_folder_gets_its_summaries_without_retraining(pipe, tmp_path, capsys):
    """Gates made before summaries existed (no summary.safetensors, no digest): a rerun of stage 4 adds them, the
    gates byte for byte as they were; the summaries equal those of a fresh run."""
    import train_anchor_gate
    gate_dir = tmp_path / "gate"
    shutil.copytree(pipe.anchor_gate, gate_dir)
    for uid in pipe.sharer_ids():
        folder = gate_dir / f"user_{uid}"
        (folder / SUMMARY_FILE).unlink()
        source = json.loads((folder / "source.json").read_text())
        del source["summary_sha256"]
        (folder / "source.json").write_text(json.dumps(source))
    before = {k: v for k, v in file_digests(gate_dir).items() if k.endswith("gates.safetensors")}
    run_stage(train_anchor_gate.main, pipe.gate_args(gate_dir), capsys)
    after = file_digests(gate_dir)
    assert {k: v for k, v in after.items() if k.endswith("gates.safetensors")} == before
    for uid in pipe.sharer_ids():
        rel = f"user_{uid}/{SUMMARY_FILE}"
        assert after[rel] == file_digest(pipe.anchor_gate / rel)
    log = [json.loads(line) for line in (gate_dir / "users_log.jsonl").read_text().splitlines()]
    assert [r.get("summary_added") for r in log[-len(pipe.sharer_ids()):]] == [True] * len(pipe.sharer_ids())


# ---- stage runs: center and routing end to end, and (d) the refusals -----------------------------------------

def test_center_run_records_its_reference_and_a_resume_with_another_calibration_is_refused(pipe, tmp_path, capsys):
    import lora_composition
    out = tmp_path / "center"
    run_stage(lora_composition.main, pipe.compose_args(out) + ["--score_calibration", "center", "--save_scores"],
              capsys)
    recipe = json.loads(next((out / "recipes").iterdir()).read_text())
    assert recipe["settings"]["score_calibration"] == "center"
    assert set(recipe["inputs"]["reference_summaries"]) == set(pipe.sharer_ids())
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["settings"]["compose"]["score_calibration"] == "center"
    assert "reference_summaries" in manifest["inputs"]
    assert file_digests(out / "recipes") != file_digests(pipe.composition / "recipes")
    err = cli_error(lora_composition.main, pipe.compose_args(out), capsys)
    assert "score_calibration" in err and "another run" in err


def test_center_without_summaries_names_the_command_that_adds_them(pipe, tmp_path, capsys):
    import lora_composition
    gate_dir = tmp_path / "gate"
    shutil.copytree(pipe.anchor_gate, gate_dir)
    (gate_dir / f"user_{pipe.sharer_ids()[1]}" / SUMMARY_FILE).unlink()
    err = cli_error(lora_composition.main, pipe.compose_args(tmp_path / "c", gate_path=gate_dir)
                    + ["--score_calibration", "center"], capsys)
    assert SUMMARY_FILE in err and "train_anchor_gate.py" in err and "keeps the gates" in err


def test_routing_stage_writes_gates_stage_5_reads_and_records_the_objective(pipe, tmp_path, capsys):
    import lora_composition
    import train_anchor_gate
    gate_dir = tmp_path / "routing"
    args = pipe.gate_args(gate_dir) + ["--gate_objective", "routing", "--routing_steps", "20"]
    out = run_stage(train_anchor_gate.main, args, capsys)
    assert "top-1 owner rate" in out
    report = json.loads((gate_dir / "routing_fit.json").read_text())
    # the fit's own step count, not --max_step (the published gates' LM steps: the demo's 8 would leave the gates
    # near their random start)
    assert report["steps"] == 20 and report["sharers"] == pipe.sharer_ids()
    assert json.loads((gate_dir / "run_manifest.json").read_text())["settings"]["routing_steps"] == 20
    for uid in pipe.sharer_ids():
        source = json.loads((gate_dir / f"user_{uid}" / "source.json").read_text())
        assert source["gate_objective"] == "routing"
        published = file_digest(pipe.anchor_gate / f"user_{uid}" / "gates.safetensors")
        assert file_digest(gate_dir / f"user_{uid}" / "gates.safetensors") != published
    assert json.loads((gate_dir / "run_manifest.json").read_text())["settings"]["gate_objective"] == "routing"
    # summary.json is the stage's "done" file (the study's resume reads it): the fit's figures and the examples'
    # truncation counts, one per sharer
    summary = json.loads((gate_dir / "summary.json").read_text())
    assert summary["routing_fit"]["held_out_top1"] == report["held_out_top1"]
    assert summary["routing_fit"]["steps"] == 20
    assert summary["truncated"]["examples"]["users"] == len(pipe.sharer_ids())
    again = file_digests(gate_dir)
    assert "every sharer's gates are done" in run_stage(train_anchor_gate.main, args, capsys)   # resume: nothing
    assert file_digests(gate_dir) == again
    # a folder of the earlier code (no summary.json): a rerun adds it and changes nothing else
    (gate_dir / "summary.json").unlink()
    assert "every sharer's gates are done" in run_stage(train_anchor_gate.main, args, capsys)
    assert json.loads((gate_dir / "summary.json").read_text())["routing_fit"] == summary["routing_fit"]
    comp = tmp_path / "comp"
    run_stage(lora_composition.main, pipe.compose_args(comp, gate_path=gate_dir), capsys)
    recipe = json.loads(next((comp / "recipes").iterdir()).read_text())
    assert set(recipe["inputs"]["gate_objective"].values()) == {"routing"}
    # (d) the published objective over this folder is refused by its manifest
    err = cli_error(train_anchor_gate.main, pipe.gate_args(gate_dir) + ["--max_step", "20"], capsys)
    assert "gate_objective" in err and "another run" in err
    err = cli_error(train_anchor_gate.main, args + ["--num_shards", "2", "--shard_id", "0"], capsys)
    assert "without --num_shards" in err
