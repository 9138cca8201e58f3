"""eval/eval_all.py and perpcs/results.py: the paper-layout table from fake prediction files."""
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from perpcs.errors import PerpcsError
from perpcs.data.tasks import TASKS
from perpcs.evaluation.metrics import evaluate_task
from perpcs.evaluation.results import (collect_results, parse_variant, row_label, to_csv, to_latex, to_markdown,
                                       variant_stems, write_results)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "eval_all.py"

MOVIE_GOLDS = [("1", "comedy"), ("2", "action"), ("3", "romance"), ("4", "classic")]
RATING_GOLDS = [("11", "1"), ("12", "3"), ("13", "5"), ("14", "4")]
HEADLINE_GOLDS = [("21", "stocks fall on rate fears"), ("22", "local team wins the cup")]


def lamp(task, pairs):
    return {"task": task, "golds": [{"id": i, "output": o} for i, o in pairs]}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def preds(root, task, run_dir, stem, outputs, golds):
    lamp_id = TASKS[task].lamp_id
    write(root / "output" / task / run_dir / "predictions" / f"{stem}.json",
          lamp(lamp_id, [(i, o) for (i, _), o in zip(golds, outputs)]))


@pytest.fixture
def tree(tmp_path):
    """Golds for two tasks and prediction files for a few methods and variants."""
    write(tmp_path / "data/movie_tagging/test_100/golds.json", lamp("LaMP_2M", MOVIE_GOLDS))
    write(tmp_path / "data/product_rating/test_100/golds.json", lamp("LaMP_3", RATING_GOLDS))
    all_right = [g for _, g in MOVIE_GOLDS]
    half_right = ["comedy", "action", "zzz", "zzz"]
    preds(tmp_path, "movie_tagging", "task-base_LLM", "kNP", half_right, MOVIE_GOLDS)
    preds(tmp_path, "movie_tagging", "task-base_LLM", "k1", all_right, MOVIE_GOLDS)
    preds(tmp_path, "movie_tagging", "task-base_LLM", "k1-profile", half_right, MOVIE_GOLDS)
    preds(tmp_path, "movie_tagging", "OPPU", "k2-profile", all_right, MOVIE_GOLDS)
    preds(tmp_path, "movie_tagging", "LoRA-Composition", "kNP", all_right, MOVIE_GOLDS)
    preds(tmp_path, "movie_tagging", "LoRA-Composition-topk1", "k1", half_right, MOVIE_GOLDS)
    preds(tmp_path, "product_rating", "task-base_LLM", "kNP", ["2", "3", "x", "4"], RATING_GOLDS)
    return tmp_path


@pytest.fixture
def full_tree(tree):
    """The tree plus the base model, both PEFT-retrieval controls, a user-blind control and a generation task."""
    write(tree / "data/news_headline/test_100/golds.json", lamp("LaMP_4", HEADLINE_GOLDS))
    preds(tree, "movie_tagging", "base_LLM", "kNP", ["zzz", "zzz", "zzz", "classic"], MOVIE_GOLDS)
    preds(tree, "movie_tagging", "LoRA-Composition-control-nearest_sharer", "kNP",
          ["comedy", "action", "romance", "zzz"], MOVIE_GOLDS)
    preds(tree, "movie_tagging", "LoRA-Composition-control-random_sharer", "k1-profile",
          ["comedy", "zzz", "zzz", "zzz"], MOVIE_GOLDS)
    preds(tree, "product_rating", "LoRA-Composition-control-random_sharer", "kNP", ["5", "5", "5", "5"], RATING_GOLDS)
    preds(tree, "movie_tagging", "LoRA-Composition-control-uniform", "kNP", ["action"] * 4, MOVIE_GOLDS)
    preds(tree, "news_headline", "OPPU", "kNP", ["stocks fall", "the cup is won by local team"], HEADLINE_GOLDS)
    preds(tree, "news_headline", "LoRA-Composition", "k1-profile", ["rate fears", "team wins"], HEADLINE_GOLDS)
    return tree


def rows_of_csv(text):
    return {(r["method"], r["setting"]): r for r in csv.DictReader(io.StringIO(text))}


def test_variant_names_and_row_labels():
    assert parse_variant("kNP") == (0, False)
    assert parse_variant("k4-profile") == (4, True)
    assert parse_variant("summary") is None and parse_variant("k1-profile-old") is None
    assert parse_variant("k0") is None and parse_variant("k01") is None   # would share kNP's / k1's row
    assert variant_stems([4, 1, 2]) == ["kNP", "k1", "k2", "k4", "kNP-profile", "k1-profile", "k2-profile",
                                        "k4-profile"]
    assert row_label("task LoRA", "kNP") == ("Non-personalized", "")
    assert row_label("task LoRA", "k2") == ("RAG", "k=2")
    assert row_label("task LoRA", "k4-profile") == ("PAG", "k=4")
    assert row_label("task LoRA", "kNP-profile") == ("PAG", "k=0")
    assert row_label("Per-Pcs", "k1") == ("Per-Pcs", "+RAG k=1")
    assert row_label("OPPU", "k1-profile") == ("OPPU", "+PAG k=1")
    assert row_label("PEFT retrieval (nearest sharer)", "kNP") == ("PEFT retrieval (nearest sharer)", "")


def block(method, ks):
    """The rows of one method of the paper for retrieval depths ks."""
    return [row_label(method, stem) for stem in variant_stems(ks)]


PAPER_ORDER = ["Base model (no LoRA)", "task LoRA", "PEFT retrieval (nearest sharer)",
               "PEFT retrieval (random sharer)", "OPPU", "Per-Pcs"]


def test_rows_follow_the_paper_order(tree):
    table = collect_results(tree / "output", tree / "data")
    # every method of the paper with every variant of the run (k=1 and k=2 were found), then the ablation dirs
    expected = [row for method in PAPER_ORDER for row in block(method, [1, 2])]
    assert table.rows == expected + [("Per-Pcs (LoRA-Composition-topk1)", "+RAG k=1")]
    assert table.rows[:13] == [
        ("Base model (no LoRA)", ""), ("Base model (no LoRA)", "+RAG k=1"), ("Base model (no LoRA)", "+RAG k=2"),
        ("Base model (no LoRA)", "+PAG k=0"), ("Base model (no LoRA)", "+PAG k=1"),
        ("Base model (no LoRA)", "+PAG k=2"),
        ("Non-personalized", ""), ("RAG", "k=1"), ("RAG", "k=2"), ("PAG", "k=0"), ("PAG", "k=1"), ("PAG", "k=2"),
        ("PEFT retrieval (nearest sharer)", "")]
    # a run with --k_list 1 2 4 has the RAG k=4 and PAG k=4 rows too
    preds(tree, "movie_tagging", "OPPU", "k4", ["comedy"] * 4, MOVIE_GOLDS)
    table = collect_results(tree / "output", tree / "data")
    assert ("RAG", "k=4") in table.rows and ("Per-Pcs", "+PAG k=4") in table.rows
    assert len(table.rows) == 6 * 8 + 1


def test_columns_are_the_seven_tasks_with_their_metric_pairs(tree):
    paths = write_results(tree / "output", tree / "data", tree / "res" / "results")
    header = paths["csv"].read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == ["method", "setting", "LaMP-1 Acc", "LaMP-1 F1", "LaMP-2M Acc", "LaMP-2M F1", "LaMP-2N Acc",
                      "LaMP-2N F1", "LaMP-3 MAE", "LaMP-3 RMSE", "LaMP-4 ROUGE-1", "LaMP-4 ROUGE-L",
                      "LaMP-5 ROUGE-1", "LaMP-5 ROUGE-L", "LaMP-7 ROUGE-1", "LaMP-7 ROUGE-L"]
    md = paths["md"].read_text(encoding="utf-8").splitlines()
    assert md[0] == ("| Method | Setting | LaMP-1 Acc ↑ | LaMP-1 F1 ↑ | LaMP-2M Acc ↑ | LaMP-2M F1 ↑ | "
                     "LaMP-2N Acc ↑ | LaMP-2N F1 ↑ | LaMP-3 MAE ↓ | LaMP-3 RMSE ↓ | LaMP-4 ROUGE-1 ↑ | "
                     "LaMP-4 ROUGE-L ↑ | LaMP-5 ROUGE-1 ↑ | LaMP-5 ROUGE-L ↑ | LaMP-7 ROUGE-1 ↑ | LaMP-7 ROUGE-L ↑ |")
    tex = paths["tex"].read_text(encoding="utf-8")
    groups = " & ".join(rf"\multicolumn{{2}}{{c}}{{{t}}}"
                        for t in ["LaMP-1", "LaMP-2M", "LaMP-2N", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"])
    assert " & & " + groups + r" \\" in tex
    assert (r"Method & Setting & Acc $\uparrow$ & F1 $\uparrow$ & Acc $\uparrow$ & F1 $\uparrow$ & Acc $\uparrow$ & "
            r"F1 $\uparrow$ & MAE $\downarrow$ & RMSE $\downarrow$ & ROUGE-1 $\uparrow$ & ROUGE-L $\uparrow$ & ") in tex
    assert r"\cmidrule(lr){3-4}" in tex and r"\cmidrule(lr){15-16}" in tex


def scored(root, task, run_dir, stem):
    """metrics.py's numbers for one predictions file."""
    gold = json.loads((root / "data" / task / "test_100/golds.json").read_text())
    pred = json.loads((root / "output" / task / run_dir / "predictions" / f"{stem}.json").read_text())
    return evaluate_task(gold, pred, TASKS[task])


def test_values_are_the_lamp_metrics_of_each_file(full_tree):
    paths = write_results(full_tree / "output", full_tree / "data", full_tree / "res" / "results")
    rows = rows_of_csv(paths["csv"].read_text(encoding="utf-8"))
    # 2 of 4 right: accuracy 1/2; macro-F1 over the 15 tags: comedy and action F1 1, the rest 0 -> 2/15
    assert float(rows[("Non-personalized", "")]["LaMP-2M Acc"]) == pytest.approx(0.5)
    assert float(rows[("Non-personalized", "")]["LaMP-2M F1"]) == pytest.approx(2 / 15)
    # LaMP-3 errors 1, 0, 4 ("x" -> 1, farther from gold 5), 0: MAE 5/4, RMSE sqrt(17/4)
    assert float(rows[("Non-personalized", "")]["LaMP-3 MAE"]) == pytest.approx(1.25)
    assert float(rows[("Non-personalized", "")]["LaMP-3 RMSE"]) == pytest.approx(math.sqrt(17 / 4))
    # every score cell is exactly metrics.py's number for its file: classification, regression, generation
    cells = [(("Non-personalized", ""), "movie_tagging", "task-base_LLM", "kNP", ["LaMP-2M Acc", "LaMP-2M F1"]),
             (("RAG", "k=1"), "movie_tagging", "task-base_LLM", "k1", ["LaMP-2M Acc", "LaMP-2M F1"]),
             (("Base model (no LoRA)", ""), "movie_tagging", "base_LLM", "kNP", ["LaMP-2M Acc", "LaMP-2M F1"]),
             (("Non-personalized", ""), "product_rating", "task-base_LLM", "kNP", ["LaMP-3 MAE", "LaMP-3 RMSE"]),
             (("PEFT retrieval (random sharer)", ""), "product_rating", "LoRA-Composition-control-random_sharer",
              "kNP", ["LaMP-3 MAE", "LaMP-3 RMSE"]),
             (("OPPU", ""), "news_headline", "OPPU", "kNP", ["LaMP-4 ROUGE-1", "LaMP-4 ROUGE-L"]),
             (("Per-Pcs", "+PAG k=1"), "news_headline", "LoRA-Composition", "k1-profile",
              ["LaMP-4 ROUGE-1", "LaMP-4 ROUGE-L"])]
    for row, task, run_dir, stem, heads in cells:
        expected = scored(full_tree, task, run_dir, stem)
        assert [float(rows[row][h]) for h in heads] == list(expected.values()), (row, task)
    assert 0 < float(rows[("OPPU", "")]["LaMP-4 ROUGE-L"]) < 1
    assert float(rows[("Per-Pcs (LoRA-Composition-topk1)", "+RAG k=1")]["LaMP-2M Acc"]) == pytest.approx(0.5)


def test_a_missing_run_is_marked_not_filled(full_tree):
    paths = write_results(full_tree / "output", full_tree / "data", full_tree / "res" / "results")
    rows = rows_of_csv(paths["csv"].read_text(encoding="utf-8"))
    # RAG k=1 ran on LaMP-2M only: its LaMP-3 cells are marked, not a number of another row or variant
    assert rows[("RAG", "k=1")]["LaMP-3 MAE"] == rows[("RAG", "k=1")]["LaMP-3 RMSE"] == "–"
    # a task nobody ran (LaMP-1, LaMP-2N), a variant nobody ran (k=2 without profile), a method's missing variant
    assert {r["LaMP-1 Acc"] for r in rows.values()} == {"–"} == {r["LaMP-2N F1"] for r in rows.values()}
    assert {v for r in rows.values() for h, v in r.items() if h not in ("method", "setting")
            and r["setting"] in ("k=2", "+RAG k=2")} == {"–"}
    assert set(list(rows[("OPPU", "+PAG k=0")].values())[2:]) == {"–"}
    md = paths["md"].read_text(encoding="utf-8")
    assert "| OPPU | +PAG k=0 | " + " | ".join(["–"] * 14) + " |" in md
    assert "– not run (no predictions file)" in md
    tex = paths["tex"].read_text(encoding="utf-8")
    assert " & +PAG k=0 & " + " & ".join(["–"] * 14) + r" \\" in tex and "– not run" in tex
    # a method not run on any task keeps its rows, every cell marked
    import shutil
    shutil.rmtree(full_tree / "output/movie_tagging/base_LLM")
    table = collect_results(full_tree / "output", full_tree / "data")
    base = [row for row in table.rows if row[0] == "Base model (no LoRA)"]
    assert len(base) == 6 and all(table.mark(row, t) == "–" for row in base for t in table.tasks)


def test_peft_retrieval_rows_read_from_their_control_folders(full_tree):
    table = collect_results(full_tree / "output", full_tree / "data")
    nearest, random_ = ("PEFT retrieval (nearest sharer)", ""), ("PEFT retrieval (random sharer)", "+PAG k=1")
    assert table.scores[nearest]["movie_tagging"] == scored(full_tree, "movie_tagging",
                                                            "LoRA-Composition-control-nearest_sharer", "kNP")
    assert table.scores[nearest]["movie_tagging"]["accuracy"] == 0.75
    assert table.scores[random_]["movie_tagging"]["accuracy"] == 0.25
    assert table.scores[("PEFT retrieval (random sharer)", "")]["product_rating"]["MAE"] == 1.75
    assert set(table.scores[nearest]) == {"movie_tagging"}      # nothing of another dir or task
    # they are rows of the paper, before OPPU; not listed again as ablation dirs. Other controls are.
    methods = [row[0] for row in table.rows]
    assert methods.index("PEFT retrieval (random sharer)") < methods.index("OPPU")
    assert not any("nearest_sharer" in m or "random_sharer" in m for m in methods)
    assert ("Per-Pcs (LoRA-Composition-control-uniform)", "") in table.rows


def grid_of_markdown(md):
    lines = [line for line in md.splitlines() if line.startswith("| ")][1:]
    return [[c.strip().replace("**", "") for c in line.strip().strip("|").split("|")] for line in lines]


def grid_of_latex(tex):
    body = tex.split("\\midrule\n", 1)[1].split("\\bottomrule")[0]
    rows, method = [], None
    for line in body.splitlines():
        if line == r"\midrule":
            continue
        cells = [c.strip() for c in line.removesuffix(r" \\").split(" & ")]
        method = cells[0] or method        # a method's name is on its first row only
        rows.append([method] + [c.replace(r"\textbf{", "").rstrip("}") for c in cells[1:]])
    return rows


def test_the_three_formats_hold_the_same_cells(full_tree):
    preds(full_tree, "movie_tagging", "OPPU", "k1", ["", "", "", ""], MOVIE_GOLDS)   # all empty: "empty"
    paths = write_results(full_tree / "output", full_tree / "data", full_tree / "res" / "results")
    md = grid_of_markdown(paths["md"].read_text(encoding="utf-8"))
    tex = grid_of_latex(paths["tex"].read_text(encoding="utf-8"))
    csv_rows = list(csv.reader(io.StringIO(paths["csv"].read_text(encoding="utf-8"))))[1:]
    as_printed = [row[:2] + [c if c in ("–", "empty") else f"{float(c):.3f}" for c in row[2:]] for row in csv_rows]
    assert md == as_printed
    assert tex == [[r[0], r[1]] + r[2:] for r in as_printed]
    marks = {c for row in md for c in row[2:]}
    assert {"–", "empty"} <= marks
    assert len(md) == len(collect_results(full_tree / "output", full_tree / "data").rows)
    oppu_rag = md[[r[:2] for r in md].index(["OPPU", "+RAG k=1"])]
    assert oppu_rag[:6] == ["OPPU", "+RAG k=1", "–", "–", "empty", "empty"]


def test_markdown_and_latex_cells(tree):
    table = collect_results(tree / "output", tree / "data")
    md = to_markdown(table).splitlines()
    non_personalized = next(line for line in md if line.startswith("| Non-personalized |"))
    cells = [c.strip() for c in non_personalized.strip("|").split("|")]
    # method, setting, LaMP-1 (not run), LaMP-2M acc/F1 (not the best), LaMP-2N (not run), LaMP-3 MAE/RMSE (bold)
    assert cells[:10] == ["Non-personalized", "", "–", "–", "0.500", "0.133", "–", "–",
                          "**1.250**", "**2.062**"]
    rag = next(line for line in md if line.startswith("| RAG | k=1 |"))
    assert "**1.000**" in rag and "**0.267**" in rag
    tex = to_latex(table)
    assert r"\multicolumn{2}{c}{LaMP-2M}" in tex and r"\cmidrule(lr){3-4}" in tex
    assert r"MAE $\downarrow$" in tex and r"\textbf{1.000}" in tex
    # task header row, metric header row, one per row, the legend
    assert tex.count(r"\\") == 2 + len(table.rows) + 1
    # under the header, a rule between methods: base model | task LoRA | nearest | random | OPPU | Per-Pcs | ablation
    assert tex.count(r"\midrule") == 1 + 6
    assert "\nPAG & k=0 &" in tex and "\nOPPU &  & " in tex


def test_news_categorize_column_when_present(tree):
    write(tree / "data/news_categorize/test_100/golds.json", lamp("LaMP_2N", [("9", "travel")]))
    preds(tree, "news_categorize", "LoRA-Composition", "k1", ["travel"], [("9", "travel")])
    table = collect_results(tree / "output", tree / "data")
    assert [t.name for t in table.tasks] == ["citation", "movie_tagging", "news_categorize", "product_rating",
                                             "news_headline", "scholarly_title", "tweet_paraphrase"]
    assert table.scores[("Per-Pcs", "+RAG k=1")]["news_categorize"]["accuracy"] == 1.0


def test_other_json_files_are_skipped(tree, capsys):
    write(tree / "output/movie_tagging/LoRA-Composition/predictions/notes.json", {"x": 1})
    table = collect_results(tree / "output", tree / "data")
    assert ("Per-Pcs", "") in table.rows
    assert "notes.json is not a variant file" in capsys.readouterr().err


def test_mismatched_ids_name_the_file(tree):
    preds(tree, "movie_tagging", "OPPU", "k1", ["comedy"], [("999", "comedy")])
    with pytest.raises(PerpcsError, match=r"OPPU/predictions/k1\.json"):
        collect_results(tree / "output", tree / "data")


def test_nothing_to_score_is_an_error(tmp_path):
    (tmp_path / "output").mkdir()
    with pytest.raises(PerpcsError, match="no prediction files"):
        write_results(tmp_path / "output", tmp_path / "data", tmp_path / "results")


def test_script_writes_three_files(tree):
    prefix = tree / "out" / "results"
    result = subprocess.run([sys.executable, str(SCRIPT), "--output_root", str(tree / "output"),
                             "--data_dir", str(tree / "data"), "--out_prefix", str(prefix)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["results.csv", "results.md", "results.tex"]
    assert "| Per-Pcs |" in prefix.with_suffix(".md").read_text(encoding="utf-8")
    bad = subprocess.run([sys.executable, str(SCRIPT), "--output_root", str(tree / "nothing"),
                          "--out_prefix", str(prefix)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no prediction files")


def test_eval_task_takes_the_test_users_golds_when_golds_json_is_absent(tmp_path):
    """The authors' processed data may come without test_100/golds.json: --data_dir derives the golds."""
    import importlib.util

    from perpcs.data.layout import Layout
    from perpcs.data.tasks import get_task
    spec = importlib.util.spec_from_file_location("eval_task", REPO / "eval" / "eval_task.py")
    eval_task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_task)
    layout = Layout(tmp_path / "data", get_task("movie_tagging"))
    query = "Which tag does this movie relate to among the following tags? [comedy] description: a film"
    users = [{"user_id": "u1", "profile": [], "query": [{"id": "7", "input": query, "gold": "comedy"},
                                                       {"id": "8", "input": query, "gold": "sci-fi"}]}]
    layout.test_users.parent.mkdir(parents=True)
    layout.test_users.write_text(json.dumps(users))
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"task": "LaMP_2M", "golds": [{"id": "7", "output": "comedy"},
                                                               {"id": "8", "output": "comedy"}]}))
    metrics = eval_task.main(["--golds_json", str(layout.golds), "--data_dir", str(tmp_path / "data"),
                              "--preds_json", str(preds), "--task_name", "movie_tagging"])
    assert metrics["accuracy"] == 0.5
    with pytest.raises(PerpcsError, match="golds"):
        eval_task.main(["--golds_json", str(layout.golds), "--preds_json", str(preds), "--task_name", "LaMP_2M"])
