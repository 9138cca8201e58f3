"""Every numeric flag is checked while the flags are parsed (issue 21): nan, inf, 0 and negative values outside a
flag's range stop the script with ``error: --flag ...`` before any data or model is read (the model and data paths
given here do not exist, so an error naming them would mean the check came too late). The typed configs refuse the
same values when the library is called without the scripts; evaluation refuses predictions that are all empty."""
import json
import math

import pytest

import lora_composition
import OPPU
import task_LoRA
import train_anchor_gate
import train_anchor_PEFT
from perpcs.__main__ import main as perpcs_main
from perpcs.checks import COUNT, DROPOUT, FRACTION, NON_NEGATIVE, POSITIVE, SEED, TEMPERATURE
from perpcs.errors import PerpcsError
from pipeline_fixture import TASK, cli_error, load_script

gen_profile = load_script("data/gen_profile.py")
history_anchor = load_script("anchor_selection/history_anchor.py")
prepare_lamp = load_script("data/prepare_lamp.py")
eval_task = load_script("eval/eval_task.py")

NOWHERE = "/nonexistent/perpcs-test"
STAGE_ARGS = ["--task_name", TASK, "--llama_model_path", f"{NOWHERE}/model", "--data_dir", f"{NOWHERE}/data",
              "--device", "cpu"]

TRAIN = {"--lr": ["nan", "inf", "0", "-1e-4"], "--weight_decay": ["nan", "-inf", "-0.1"],
         "--clip": ["nan", "0", "-1"], "--batch_size": ["0", "-1", "nan"], "--accum_iter": ["0"],
         "--epochs": ["0"], "--max_step": ["0", "-3"], "--max_seq_len": ["0", "-5", "nan"],
         "--seed": ["-1", "4294967296", "nan", "1.5", "9" * 400]}
LORA = {"--lora_r": ["0", "nan"], "--lora_alpha": ["nan", "inf", "0", "-8"], "--lora_dropout": ["nan", "1", "-0.1"]}
GENERATION = {"--temperature": ["nan", "inf", "-0.1"], "--top_p": ["nan", "0", "1.5"], "--max_gen_len": ["0", "-1"],
              "--gen_batch_size": ["0", "-2"], "--k_list": ["0", "nan"]}
SHARDS = {"--num_shards": ["0", "-1"], "--shard_id": ["-1", "nan"]}
COMPOSE = {"--agg_temperature": ["nan", "inf", "0", "-1"], "--share_ratio": ["nan", "inf"], "--topk": ["0", "nan"],
           "--recent_k": ["0"], "--epochs": ["0"], "--batch_size": ["0"], "--max_seq_len": ["0", "nan"],
           "--seed": ["-1"], "--sample_topk": ["0"], "--sample_temperature": ["nan", "0", "-1"],
           "--sample_top_p": ["nan", "0", "1.01"]}
SCRIPTS = {   # script: (main, its arguments but the flag under test, {flag: refused values})
    "task_LoRA": (task_LoRA.main, STAGE_ARGS, {**LORA, **TRAIN, **GENERATION, "--k": ["-1", "nan"]}),
    "train_anchor_PEFT": (train_anchor_PEFT.main, STAGE_ARGS, {**LORA, **TRAIN, **SHARDS}),
    "train_anchor_gate": (train_anchor_gate.main, STAGE_ARGS, {**TRAIN, **SHARDS, "--recent_k": ["0", "-1"]}),
    "lora_composition": (lora_composition.main, STAGE_ARGS, {**GENERATION, **SHARDS, **COMPOSE}),
    "OPPU": (OPPU.main, STAGE_ARGS, {**LORA, **TRAIN, **GENERATION, **SHARDS, "--k": ["-1", "nan"]}),
    "gen_profile": (gen_profile.main, ["--task_name", TASK, "--model_path", f"{NOWHERE}/model",
                                       "--data_dir", f"{NOWHERE}/data", "--device", "cpu"],
                    {"--k": ["-1", "nan"], "--max_gen_len": ["0"], "--max_seq_len": ["0"], "--batch_size": ["0"],
                     "--temperature": ["nan", "-1"], "--top_p": ["nan", "0"], "--seed": ["-1"]}),
    "history_anchor": (history_anchor.main, ["--task_name", TASK, "--candidate_path", f"{NOWHERE}/candidates.json",
                                             "--output_dir", f"{NOWHERE}/out", "--encoder", f"{NOWHERE}/encoder"],
                       {"--k": ["0", "nan"], "--min_history": ["-1"], "--seed": ["-1"], "--batch_size": ["0"],
                        "--max_length": ["0"]}),
    "prepare_lamp": (prepare_lamp.main, ["--task_name", TASK, "--lamp_dir", f"{NOWHERE}/lamp", "--out_dir",
                                         f"{NOWHERE}/data"],
                     {"--base_frac": ["nan", "inf", "-0.1"], "--candidate_frac": ["nan", "1.5"],
                      "--reserve_frac": ["-inf"], "--n_test": ["-1"]}),
    "perpcs_show_prompts": (perpcs_main, ["show-prompts", "--task_name", TASK, "--data_dir", f"{NOWHERE}/data"],
                            {"--n": ["0", "nan"], "--k": ["-1"]}),
}
REFUSED = [(name, flag, value) for name, (_, _, flags) in SCRIPTS.items() for flag, values in flags.items()
           for value in values]


@pytest.mark.parametrize("name,flag,value", REFUSED, ids=[f"{n}{f}={v[:12]}" for n, f, v in REFUSED])
def test_a_value_out_of_range_is_refused_naming_the_flag_before_anything_loads(name, flag, value, capsys):
    main, argv, _ = SCRIPTS[name]
    err = cli_error(main, argv + [f"{flag}={value}"], capsys)   # "=": argparse reads -1e-4 as a flag
    assert err.startswith(f"error: {flag} ") and NOWHERE not in err, err


ACCEPTED = [("task_LoRA", ["--temperature", "0", "--top_p", "1", "--lora_dropout", "0", "--weight_decay", "0",
                           "--lr", "1e30", "--seed", "4294967295"]),
            ("lora_composition", ["--share_ratio", "1", "--sample_top_p", "1", "--max_gen_len", "4",
                                  "--max_seq_len", "53"]),   # 1 BOS + 48 words of the movie_tagging instruction + 4
            ("OPPU", ["--k", "0"]),
            ("task_LoRA", ["--k", "0"]),   # the OPPU release's task_LoRA.py spelling
            ("gen_profile", ["--k", "0", "--temperature", "0"]),
            ("history_anchor", ["--min_history", "0"])]


@pytest.mark.parametrize("name,extra", ACCEPTED, ids=[n for n, _ in ACCEPTED])
def test_the_ends_of_each_range_pass_the_flag_checks(name, extra):
    main, argv, _ = SCRIPTS[name]
    parse_args = {"gen_profile": gen_profile, "history_anchor": history_anchor}.get(name)
    parse_args = (parse_args or {"task_LoRA": task_LoRA, "lora_composition": lora_composition, "OPPU": OPPU}[name])
    parse_args.parse_args(argv + extra)


@pytest.mark.parametrize("name,extra,message", [
    ("lora_composition", ["--max_seq_len", "58"], "--max_seq_len 58 is too small for movie_tagging: at least 59 = "
                                                  "1 (BOS) + 48 (the words of the task's instruction"),
    ("lora_composition", ["--max_gen_len", "100", "--max_seq_len", "148"], "at least 149 = 1 (BOS) + 48 (the words "
                                                                           "of the task's instruction, at least a "
                                                                           "token each) + 100 (--max_gen_len 100)"),
    ("train_anchor_gate", ["--max_seq_len", "58"], "+ 10 (movie_tagging's answer length 10)"),
    ("task_LoRA", ["--max_seq_len", "1"], "--max_seq_len 1 is too small"),
    ("gen_profile", ["--max_seq_len", "150"], "--max_seq_len 150 is too small for movie_tagging: at least 159 = "
                                              "1 (BOS) + 30 (the words of the profile instruction"),
    ("train_anchor_PEFT", ["--num_shards", "2", "--shard_id", "2"], "--shard_id 2 must be in [0, --num_shards 2)"),
    ("OPPU", ["--k_list", "1", "2", "1"], "--k_list must be distinct, got 1 2 1"),
])
def test_flags_checked_together(name, extra, message, capsys):
    main, argv, _ = SCRIPTS[name]
    err = cli_error(main, argv + extra, capsys)
    assert message in err and NOWHERE not in err, err


def test_help_states_the_ranges(capsys):
    with pytest.raises(SystemExit):
        lora_composition.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "softmax temperature of the mix (and of the draw with --sample --sample_top_p) (positive)" in text
    assert "at least 1 (BOS) + the words of the task's instruction + --max_gen_len" in text
    assert "--top_p TOP_P in (0, 1]" in text and "(0 = greedy)" in text


# ---- the library's typed configs -------------------------------------------------------------------------------

def _configs():
    from perpcs.engine.training import TrainConfig
    from perpcs.method.composition import ComposeSettings
    from perpcs.stages.config import (CompositionStage, GenerationConfig, LoraSettings, ProfileConfig, ShardConfig,
                                      SharerGateStage, StageInputs)
    nan, inf = math.nan, math.inf
    return [
        (lambda: TrainConfig(lr=nan), "--lr"), (lambda: TrainConfig(clip=inf), "--clip"),
        (lambda: TrainConfig(weight_decay=nan), "--weight_decay"), (lambda: TrainConfig(epochs=nan), "--epochs"),
        (lambda: ComposeSettings(agg_temperature=nan), "--agg_temperature"),
        (lambda: ComposeSettings(share_ratio=nan), "--share_ratio"),
        (lambda: ComposeSettings(sample_temperature=nan), "--sample_temperature"),
        (lambda: ComposeSettings(sample_top_p=nan), "--sample_top_p"), (lambda: ComposeSettings(topk=0), "--topk"),
        (lambda: GenerationConfig(temperature=nan), "--temperature"), (lambda: GenerationConfig(top_p=nan), "--top_p"),
        (lambda: GenerationConfig(max_gen_len=0), "--max_gen_len"),
        (lambda: GenerationConfig(batch_size=0), "--gen_batch_size"),
        (lambda: GenerationConfig(k_list=(1, 1)), "--k_list"),
        (lambda: LoraSettings(alpha=nan), "--lora_alpha"), (lambda: LoraSettings(dropout=nan), "--lora_dropout"),
        (lambda: LoraSettings(r=0), "--lora_r"), (lambda: ShardConfig(num_shards=0), "--num_shards"),
        (lambda: ShardConfig(num_shards=2, shard_id=3), "--shard_id"),
        (lambda: ProfileConfig(task_name=TASK, temperature=nan), "--temperature"),
        (lambda: ProfileConfig(task_name=TASK, max_seq_len=100), "--max_seq_len 100 is too small"),
        (lambda: SharerGateStage(inputs=StageInputs(TASK), recent_k=0), "--recent_k"),
        (lambda: CompositionStage(inputs=StageInputs(TASK), max_seq_len=20), "--max_seq_len 20 is too small"),
    ]


@pytest.mark.parametrize("case", range(len(_configs())))
def test_typed_configs_refuse_the_same_values(case):
    make, flag = _configs()[case]
    with pytest.raises(PerpcsError, match="^" + flag.replace("(", r"\(")):
        make()


def test_the_library_keeps_what_its_callers_rely_on():
    from perpcs.engine.training import TrainConfig
    from perpcs.method.composition import ComposeSettings
    from perpcs.stages.config import GenerationConfig
    assert TrainConfig(lr=0.0).lr == 0.0                        # the loss measured without learning (the scripts: > 0)
    assert ComposeSettings(sample_temperature=0).selection_mode == 1   # refused only by the modes that use it
    assert GenerationConfig(max_gen_len=None).recorded(type("T", (), {"max_gen_len": 10})())["max_gen_len"] == 10


@pytest.mark.parametrize("rule,good,bad", [
    (POSITIVE, [1e-30, 1e30], [0, -1]), (NON_NEGATIVE, [0, 3.5], [-1e-9]), (COUNT, [1, 10**9], [0, 1.5]),
    (FRACTION, [1, 1e-9], [0, 1.0001]), (DROPOUT, [0, 0.999], [1, -0.1]), (TEMPERATURE, [0, 2], [-0.1]),
    (SEED, [0, 2**32 - 1], [-1, 2**32])])
def test_rules_never_pass_nan_or_inf(rule, good, bad):
    assert all(rule.holds(v) for v in good)
    assert not any(rule.holds(v) for v in bad + [math.nan, math.inf, -math.inf, True, "1", None])


# ---- evaluation of predictions that are all empty --------------------------------------------------------------

def lamp(task, pairs):
    return {"task": task, "golds": [{"id": i, "output": o} for i, o in pairs]}


def test_eval_task_refuses_a_file_of_empty_outputs(tmp_path, capsys):
    golds, preds = tmp_path / "golds.json", tmp_path / "k1.json"
    golds.write_text(json.dumps(lamp("LaMP_3", [("1", "2"), ("2", "4"), ("3", "5")])))
    preds.write_text(json.dumps(lamp("LaMP_3", [("1", ""), ("2", " "), ("3", "\n")])))
    argv = ["--golds_json", str(golds), "--preds_json", str(preds), "--task_name", "product_rating"]
    err = cli_error(eval_task.main, argv + ["--output_file", str(tmp_path / "m.json")], capsys)
    assert err.startswith(f"error: {preds}: every one of the 3 outputs is empty; nothing was generated")
    assert "--agg_temperature nan" in err and "--allow_empty" in err
    assert not (tmp_path / "m.json").exists()
    assert eval_task.main(argv + ["--allow_empty"])["MAE"] == pytest.approx(10 / 3)   # the override scores it
    preds.write_text(json.dumps(lamp("LaMP_3", [("1", ""), ("2", "4"), ("3", "")])))  # some empty: scored
    assert eval_task.main(argv)["MAE"] == pytest.approx(7 / 3)


def test_results_table_marks_an_empty_file_instead_of_scoring_it(tmp_path, capsys):
    from perpcs.evaluation.results import to_csv, to_markdown, collect_results
    golds = [("1", "comedy"), ("2", "action")]
    (tmp_path / "data/movie_tagging/test_100").mkdir(parents=True)
    (tmp_path / "data/movie_tagging/test_100/golds.json").write_text(json.dumps(lamp("LaMP_2M", golds)))
    for run_dir, stem, outputs in (("task-base_LLM", "kNP", ["comedy", "action"]), ("LoRA-Composition", "kNP", ["", ""])):
        path = tmp_path / "output/movie_tagging" / run_dir / "predictions" / f"{stem}.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(lamp("LaMP_2M", list(zip(["1", "2"], outputs)))))
    table = collect_results(tmp_path / "output", tmp_path / "data")
    assert "LoRA-Composition/predictions/kNP.json: every one of the 2 outputs is empty" in capsys.readouterr().err
    md = to_markdown(table)
    assert "| Per-Pcs |  | – | – | empty | empty | – |" in md and "| Non-personalized |  | – | – | **1.000** |" in md
    assert "Per-Pcs,,–,–,empty,empty,–" in to_csv(table)   # LaMP-1 not run, LaMP-2M empty, LaMP-2N not run
