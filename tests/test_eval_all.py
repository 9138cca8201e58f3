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
from perpcs.evaluation.results import (collect_results, parse_variant, row_label, to_latex, to_markdown,
                                       write_results)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "eval_all.py"

MOVIE_GOLDS = [("1", "comedy"), ("2", "action"), ("3", "romance"), ("4", "classic")]
RATING_GOLDS = [("11", "1"), ("12", "3"), ("13", "5"), ("14", "4")]


def lamp(task, pairs):
    return {"task": task, "golds": [{"id": i, "output": o} for i, o in pairs]}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def preds(root, task, run_dir, stem, outputs, golds):
    lamp_id = {"movie_tagging": "LaMP_2M", "product_rating": "LaMP_3", "news_categorize": "LaMP_2N"}[task]
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


def rows_of_csv(text):
    return {(r["method"], r["setting"]): r for r in csv.DictReader(io.StringIO(text))}


def test_variant_names_and_row_labels():
    assert parse_variant("kNP") == (0, False)
    assert parse_variant("k4-profile") == (4, True)
    assert parse_variant("summary") is None and parse_variant("k1-profile-old") is None
    assert parse_variant("k0") is None and parse_variant("k01") is None   # would share kNP's / k1's row
    assert row_label("task LoRA", "kNP") == ("Non-personalized", "")
    assert row_label("task LoRA", "k2") == ("RAG", "k=2")
    assert row_label("task LoRA", "k4-profile") == ("PAG", "k=4")
    assert row_label("task LoRA", "kNP-profile") == ("PAG", "k=0")
    assert row_label("Per-Pcs", "k1") == ("Per-Pcs", "+RAG k=1")
    assert row_label("OPPU", "k1-profile") == ("OPPU", "+PAG k=1")


def test_csv_holds_the_lamp_metrics_of_each_file(tree):
    paths = write_results(tree / "output", tree / "data", tree / "res" / "results")
    rows = rows_of_csv(paths["csv"].read_text())
    # 2 of 4 right: accuracy 1/2; macro-F1 over the 15 tags: comedy and action F1 1, the rest 0 -> 2/15
    assert float(rows[("Non-personalized", "")]["LaMP-2M Acc"]) == pytest.approx(0.5)
    assert float(rows[("Non-personalized", "")]["LaMP-2M F1"]) == pytest.approx(2 / 15)
    assert float(rows[("RAG", "k=1")]["LaMP-2M Acc"]) == pytest.approx(1.0)
    assert float(rows[("RAG", "k=1")]["LaMP-2M F1"]) == pytest.approx(4 / 15)
    # LaMP-3 errors 1, 0, 4 ("x" -> 1, farther from gold 5), 0: MAE 5/4, RMSE sqrt(17/4)
    assert float(rows[("Non-personalized", "")]["LaMP-3 MAE"]) == pytest.approx(1.25)
    assert float(rows[("Non-personalized", "")]["LaMP-3 RMSE"]) == pytest.approx(math.sqrt(17 / 4))
    assert rows[("RAG", "k=1")]["LaMP-3 MAE"] == ""          # no LaMP-3 k1 file
    assert float(rows[("Per-Pcs (LoRA-Composition-topk1)", "+RAG k=1")]["LaMP-2M Acc"]) == pytest.approx(0.5)
    # the six tasks of the paper are columns even without files; LaMP-2N only when it has predictions
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert header[:4] == ["method", "setting", "LaMP-1 Acc", "LaMP-1 F1"]
    assert "LaMP-7 ROUGE-L" in header and not any("LaMP-2N" in h for h in header)


def test_rows_follow_the_paper_order(tree):
    table = collect_results(tree / "output", tree / "data")
    assert table.rows == [("Non-personalized", ""), ("RAG", "k=1"), ("PAG", "k=1"), ("OPPU", "+PAG k=2"),
                          ("Per-Pcs", ""), ("Per-Pcs (LoRA-Composition-topk1)", "+RAG k=1")]


def test_markdown_and_latex_cells(tree):
    table = collect_results(tree / "output", tree / "data")
    md = to_markdown(table).splitlines()
    assert md[0].startswith("| Method | Setting | LaMP-1 Acc ↑ | LaMP-1 F1 ↑ | LaMP-2M Acc ↑")
    assert "LaMP-3 MAE ↓" in md[0]
    non_personalized = next(line for line in md if line.startswith("| Non-personalized |"))
    cells = [c.strip() for c in non_personalized.strip("|").split("|")]
    # method, setting, LaMP-1 (2 missing), LaMP-2M acc/F1 (not the best), LaMP-3 MAE/RMSE (the only ones: bold)
    assert cells[:8] == ["Non-personalized", "", "-", "-", "0.500", "0.133", "**1.250**", "**2.062**"]
    rag = next(line for line in md if line.startswith("| RAG |"))
    assert "**1.000**" in rag and "**0.267**" in rag
    tex = to_latex(table)
    assert r"\multicolumn{2}{c}{LaMP-2M}" in tex and r"\cmidrule(lr){3-4}" in tex
    assert r"MAE $\downarrow$" in tex and r"\textbf{1.000}" in tex
    assert tex.count(r"\\") == 2 + len(table.rows)   # task header row, metric header row, one per row
    # under the header, a rule between blocks: task LoRA baselines | OPPU | Per-Pcs | Per-Pcs (LoRA-Composition-topk1)
    assert tex.count(r"\midrule") == 1 + 3


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
    assert "| Per-Pcs |" in prefix.with_suffix(".md").read_text()
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
