"""The held-out-seed study: its plan (never the demo's seed, each sample apart, base rows first, shared stage runs
once) and its scoring (gap closed, mean and spread over seeds) on a prepared sample with hand-made predictions."""
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from perpcs.data.layout import Layout
from perpcs.data.prepare import prepare_lamp
from perpcs.data.sample import write_sample
from perpcs.data.tasks import get_task
from perpcs.errors import PerpcsError
from perpcs.method.recipes import GATE_SCORES_FORMAT, RECIPE_FORMAT, pooled_vectors_bytes
from perpcs.experiments.study import (VARIANTS, SampleDirs, Sample, StudyConfig, StudySetting, check_config,
                                      collect, gap_closed, parse_sweeps, plan)


def _config(tmp_path, **kw):
    base = dict(tasks=["movie_tagging"], seeds=[1, 2], n_groups=[3, 5], root=tmp_path / "study",
                sweeps={"k": [8], "topk": [2]}, sweep_groups=[5], python="python")
    return StudyConfig(**{**base, **kw})


def test_the_demo_seed_is_refused(tmp_path):
    with pytest.raises(PerpcsError, match="demo"):
        check_config(_config(tmp_path, seeds=[0, 1]))
    with pytest.raises(PerpcsError, match="unknown sweep"):
        check_config(_config(tmp_path, sweeps={"lr": [1]}))
    with pytest.raises(PerpcsError, match="NAME=V1,V2"):
        parse_sweeps(["k"])
    assert parse_sweeps(["k=2,8", "topk=3"]) == {"k": [2, 8], "topk": [3]}


def test_plan_keeps_samples_apart_and_runs_base_rows_first(tmp_path):
    cfg = _config(tmp_path)
    (phase1, base), (phase2, sweeps) = plan(cfg)
    assert (phase1, phase2) == ("base setting", "sweeps")
    assert set(base) == {Sample("movie_tagging", s, g) for s in (1, 2) for g in (3, 5)}
    for sample, steps in base.items():
        root = str(SampleDirs(cfg.root, sample).root)
        # every path a step names is inside the sample's own folder (no two samples share data or outputs)
        for step in steps:
            paths = [a for a in step.argv if "/" in a and not a.endswith(".py")]
            assert paths and all(a.startswith(root) for a in paths), step.argv
        make_sample = steps[0].argv
        assert make_sample[make_sample.index("--seed") + 1] == str(sample.seed)
        assert make_sample[make_sample.index("--n_groups") + 1] == str(sample.n_groups)
        names = [s.name for s in steps]
        assert names[:5] == ["sample", "prepare", "profiles", "task LoRA", "OPPU"]
        assert [n for n in names if n.startswith("control")] == ["control uniform", "control swapped",
                                                                 "control peft_merge"]
    # sweeps only on the 5-group samples; the top-k point reuses the base's stages 2-4 (not run twice)
    assert all(not steps for s, steps in sweeps.items() if s.n_groups == 3)
    for s, steps in sweeps.items():
        if s.n_groups == 5:
            assert [st.name for st in steps] == ["sharers k=8", "sharer LoRAs (20 steps) for k=8", "gates (8 steps) for k=8",
                                                 "Per-Pcs k8-s20-g8-top1-r16", "Per-Pcs k4-s20-g8-top2-r16"]
            topk = steps[-1].argv
            assert topk[topk.index("--topk") + 1] == "2"
            # a restart skips finished stages 3 and 4: done when their summary.json is there and every sharer
            # of this k's index has its file (the dirs are shared with the base's smaller pool)
            lora, gates = steps[1], steps[2]
            index = Path(lora.argv[lora.argv.index("--anchor_idx_path") + 1])
            for step, file in ((lora, "adapter_model.safetensors"), (gates, "gates.safetensors")):
                out = Path(step.argv[step.argv.index("--output_dir") + 1])
                out.mkdir(parents=True)
                (out / "summary.json").write_text("{}")
                assert not step.is_done()                      # no index yet
                index.parent.mkdir(parents=True, exist_ok=True)
                index.write_text(json.dumps({"user_ids": ["u1", "u2"]}))
                (out / "user_u1").mkdir()
                (out / "user_u1" / file).write_text("x")
                assert not step.is_done()                      # u2, new in this pool, is missing
                (out / "user_u2").mkdir()
                (out / "user_u2" / file).write_text("x")
                assert step.is_done()
    # Per-Pcs runs keep their gate scores (the study's "user / offset" columns); the controls need none
    for st in [st for steps in base.values() for st in steps]:
        assert ("--save_scores" in st.argv) == st.name.startswith("Per-Pcs"), st.name


def test_gap_closed():
    assert gap_closed(0.6, 0.2, 1.0, higher=True) == pytest.approx(0.5)
    assert gap_closed(0.2, 0.2, 1.0, higher=True) == 0
    assert gap_closed(1.0, 1.5, 0.5, higher=False) == pytest.approx(0.5)     # MAE: lower is better
    assert gap_closed(2.0, 1.5, 0.5, higher=False) == pytest.approx(-0.5)
    assert gap_closed(0.5, 0.8, 0.8, higher=True) is None                    # no gap to close
    assert gap_closed(None, 0.8, 0.9, higher=True) is None


def _write_predictions(out_dir: Path, golds: dict, task, n_right: int) -> None:
    """kNP and k1 files whose first n_right answers (by sorted id) are right, the others a wrong label."""
    ids = sorted(golds)
    wrong = {g: next(label for label in task.labels if label != g) for g in set(golds.values())}
    preds = [{"id": i, "output": golds[i] if n < n_right else wrong[golds[i]]} for n, i in enumerate(ids)]
    for variant in ("kNP", "k1"):
        path = out_dir / "predictions" / f"{variant}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": task.lamp_id, "golds": preds}))


def test_scores_gap_and_spread_over_seeds(tmp_path):
    """Two prepared samples (real sample data, no model): predictions with a known number of right answers give
    the accuracies, the gap closed and the mean and sd over seeds the study reports."""
    task = get_task("movie_tagging")
    cfg = _config(tmp_path, n_groups=[5], sweeps={}, controls=("uniform",))
    right = {1: (0, 8, 4, 2), 2: (4, 8, 8, 4)}     # seed -> task LoRA, OPPU, Per-Pcs, uniform control
    for seed, (t, o, p, u) in right.items():
        d = SampleDirs(cfg.root, Sample("movie_tagging", seed, 5))
        write_sample("movie_tagging", d.raw, n_users=12, n_history=6, n_queries=2, seed=seed, n_groups=5)
        prepare_lamp("movie_tagging", d.raw, d.data, 4, 0, 0.5, 0.4, 0.1, "abstract")
        golds = {g["id"]: g["output"] for g in Layout(d.data, task).load_golds()["golds"]}
        assert len(golds) == 8
        _write_predictions(d.task_lora, golds, task, t)
        _write_predictions(d.oppu, golds, task, o)
        _write_predictions(d.composition(cfg.base), golds, task, p)
        _write_predictions(d.composition(cfg.base, None, "uniform"), golds, task, u)   # gate-free: no variant
    # two recipes of seed 1 that agree on 3 of their 4 pieces' dominant sharer
    recipes = SampleDirs(cfg.root, Sample("movie_tagging", 1, 5)).composition(cfg.base) / "recipes"
    recipes.mkdir(parents=True)
    pieces = [f"model.layers.{la}.self_attn.{m}" for la in range(2) for m in ("q_proj", "v_proj")]
    for uid, tops in (("a", "xxxy"), ("b", "xxxx")):
        (recipes / f"user_{uid}.json").write_text(json.dumps({
            "format": RECIPE_FORMAT, "user_id": uid, "task": "movie_tagging", "sharers": ["x", "y"],
            "pieces": {p: [[top, 1.0]] for p, top in zip(pieces, tops)}}))
    # their gate scores: one piece, offset (+1, -1) for sharers (x, y), user parts (+0.25, -0.25) for a, the
    # opposite for b: user / offset = 0.25; both rank x first, by the user part a -> x, b -> y
    scores = recipes.parent / "gate_scores"
    scores.mkdir()
    for uid, part in (("a", 0.25), ("b", -0.25)):
        (scores / f"user_{uid}.json").write_text(json.dumps({
            "format": GATE_SCORES_FORMAT, "user_id": uid, "sharers": ["x", "y"],
            "scores": {pieces[0]: [1.0 + part, -1.0 - part]}}))
    # and their pooled vectors: mean (4, 1), each 2 away from it
    for uid, vector in (("a", [4.0, 3.0]), ("b", [4.0, -1.0])):
        (scores / f"user_{uid}.safetensors").write_bytes(pooled_vectors_bytes(
            {pieces[0]: torch.tensor(vector)}, uid, "movie_tagging"))
    summary = collect(cfg)
    rows = {r["seed"]: r for r in summary["rows"]}
    assert rows[1]["same_sharer"]["same"] == pytest.approx(0.75) and "same_sharer" not in rows[2]
    assert rows[1]["gate_scores"]["ratio"] == pytest.approx(0.25) and "gate_scores" not in rows[2]
    assert rows[1]["gate_scores"]["same_by_user"] == 0.0 and rows[1]["gate_scores"]["own_by_score"] is None
    assert rows[1]["kNP"]["Per-Pcs"] == 0.5 and rows[1]["kNP"]["gap_closed"] == pytest.approx(0.5)
    assert rows[2]["kNP"]["Per-Pcs"] == 1.0 and rows[2]["kNP"]["gap_closed"] == pytest.approx(1.0)
    assert rows[1]["kNP"]["control uniform"] == 0.25
    (agg,) = summary["aggregate"]
    assert agg["seeds"] == [1, 2]
    assert agg["kNP"]["gap_closed"]["mean"] == pytest.approx(0.75)
    assert agg["kNP"]["gap_closed"]["sd"] == pytest.approx(statistics.stdev([0.5, 1.0]))
    assert agg["kNP"]["task LoRA"]["mean"] == pytest.approx(0.25)
    table = (cfg.root / "study.md").read_text()
    assert "75% ± 0% (" in table      # same top sharer: seed 1 only
    # gate scores: user / offset; pooled spread and cosine (seed 1's two users: (4,3), (4,-1)); own group: none
    assert rows[1]["pooled"]["spread"] == pytest.approx(2 / math.sqrt(17)) and "pooled" not in rows[2]
    assert rows[1]["pooled"]["cosine"] == pytest.approx(13 / (5 * math.sqrt(17)))
    assert f"| 0.25 ± 0.00 | {2 / math.sqrt(17):.0%} ± 0% | {13 / (5 * math.sqrt(17)):.2f} ± 0.00 | - |" in table
    assert "| 5 | published | 4, 20, 8, 1, 16 (base) |" in table
    assert "**published** at k4-s20-g8-top1-r16" in table and summary["summary"]["variant"] == "published"
    assert "75% ± 35%" in table and "the demo's seed 0 is not one" in table
    assert (cfg.root / "study.png").stat().st_size > 0


def _flag(argv: list, name: str):
    return argv[argv.index(name) + 1] if name in argv else None


def test_variants_put_their_flags_exactly_where_they_belong(tmp_path):
    """Four variants and the k sweep on one 5-group sample: --gate_objective routing on the routing variants' gate
    training only, --score_calibration center on the center variants' Per-Pcs and swapped runs only; the published
    variant's commands are today's; the gate-free controls run once per setting (the k sweep's too)."""
    cfg = _config(tmp_path, seeds=[1], n_groups=[5], sweeps={}, variants=tuple(VARIANTS), k_per_group=(1, 2),
                  controls=("uniform", "swapped", "peft_merge", "nearest_sharer", "random_sharer"))
    (_, base), (_, sweeps) = plan(cfg)
    steps = base[Sample("movie_tagging", 1, 5)] + sweeps[Sample("movie_tagging", 1, 5)]
    assert len({tuple(st.argv) for st in steps}) == len(steps)
    by_name = {st.name: st.argv for st in steps}
    assert len(by_name) == len(steps)        # every name (and log file) once
    for st in steps:
        routing, center = _flag(st.argv, "--gate_objective"), _flag(st.argv, "--score_calibration")
        gates_step, compose_step = "--anchor_path" in st.argv, "lora_composition.py" in " ".join(st.argv)
        assert routing == ("routing" if gates_step and "routing" in st.name else None), st.name
        assigned = compose_step and "center" in st.name.split()[-1]
        assert center == ("center" if assigned else None), st.name
        if compose_step:   # routing gates for the routing variants' assemblies, the published ones elsewhere
            gate_dir = _flag(st.argv, "--gate_dir")
            assert gate_dir.endswith("-routing-k" + _flag(st.argv, "--anchor_idx_path").split("/k")[-1].split("/")[0]) \
                == st.name.split()[-1].startswith("routing"), st.name
    # the k sweep: base k 4, then 5 and 10, each with its controls; gate-free controls once per k, swapped per variant
    ks = sorted({int(_flag(a, "--k")) for n, a in by_name.items() if n.startswith("sharers")})
    assert ks == [4, 5, 10]
    # each pool trains in its own folder (stage 3 refuses to add sharers to a smaller pool's); the base k's is
    # where it always was, so earlier studies resume; every run reads the pool of its own sharer index
    lora_dirs = {int(_flag(a, "--anchor_idx_path").split("/k")[-1].split("/")[0]): _flag(a, "--output_dir")
                 for n, a in by_name.items() if n.startswith("sharer LoRAs")}
    assert lora_dirs[4].endswith("sharers/steps20/LoRA") and lora_dirs[5].endswith("sharers/steps20-k5/LoRA")
    assert len(set(lora_dirs.values())) == 3
    for n, a in by_name.items():
        k = _flag(a, "--anchor_idx_path")
        lora = _flag(a, "--anchor_dir") or _flag(a, "--anchor_path")
        if k and lora:
            assert lora == lora_dirs[int(k.split("/k")[-1].split("/")[0])], n
            gates = _flag(a, "--gate_dir") or _flag(a, "--output_dir")
            assert Path(gates).parent == Path(lora).parent, n
    controls = [n for n in by_name if n.startswith("control")]
    assert len([n for n in controls if n.startswith("control uniform")]) == 3
    assert len([n for n in controls if n.startswith("control swapped")]) == 3 * len(VARIANTS)
    assert "control nearest_sharer k10-s20-g8-top1-r16" in by_name
    assert [n for n in by_name if n.startswith("Per-Pcs k4")] == [
        "Per-Pcs k4-s20-g8-top1-r16", "Per-Pcs k4-s20-g8-top1-r16 center", "Per-Pcs k4-s20-g8-top1-r16 routing",
        "Per-Pcs k4-s20-g8-top1-r16 routing+center"]
    assert _flag(by_name["Per-Pcs k4-s20-g8-top1-r16 routing+center"], "--output_dir").endswith(
        "compose/k4-s20-g8-top1-r16-routing-center")
    # the published variant alone: no new flag anywhere (the commands the earlier study ran)
    published = plan(_config(tmp_path, seeds=[1], n_groups=[5], sweeps={}))
    flat = [a for _, phase in published for steps in phase.values() for st in steps for a in st.argv]
    assert "--gate_objective" not in flat and "--score_calibration" not in flat
    # only routing: the gate-free controls run on the routing gates (no published gate training planned)
    only = plan(_config(tmp_path, seeds=[1], n_groups=[5], sweeps={}, variants=("routing",)))[0][1]
    names = [st.name for st in only[Sample("movie_tagging", 1, 5)]]
    assert "gates (8 steps)" not in names and "gates (8 steps, routing, k=4)" in names
    with pytest.raises(PerpcsError, match="--variants"):
        check_config(_config(tmp_path, variants=("bogus",)))
    with pytest.raises(PerpcsError, match="demo"):
        check_config(_config(tmp_path, seeds=[0], variants=tuple(VARIANTS)))


def test_dry_run_prints_every_command_and_runs_none(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("study_script", Path(__file__).parents[1] / "scripts" / "study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    study.main(["--dry_run", "--root", str(tmp_path / "s"), "--seeds", "1", "--n_groups", "5", "--tasks",
                "product_rating", "--jobs", "1"])
    out = capsys.readouterr().out
    assert not (tmp_path / "s").exists()
    commands = [line.strip() for line in out.splitlines() if line.startswith("    ")]
    assert len(commands) == 53 and sum("--score_calibration center" in c for c in commands) == 12
    assert "dry run: 53 steps to run:" in out and "24 x control swapped" not in out and "12 x control swapped" in out
