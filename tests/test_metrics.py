"""LaMP metrics (docs/method.md section 8) on cases small enough to compute by hand, and eval/eval_task.py."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from perpcs.errors import PerpcsError
from perpcs.evaluation.metrics import (classification_metrics, evaluate_task, generation_metrics, parse_rating,
                                       regression_metrics)
from perpcs.data.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "eval_task.py"


def lamp(task, pairs):
    return {"task": task, "golds": [{"id": i, "output": o} for i, o in pairs]}


# ---- classification -------------------------------------------------------------------------

def test_accuracy_and_macro_f1_by_hand():
    # golds a a b c, preds a b b zzz (zzz is not a label)
    # class a: TP 1, FP 0, FN 1 -> P 1,   R 1/2 -> F1 2/3
    # class b: TP 1, FP 1, FN 0 -> P 1/2, R 1   -> F1 2/3
    # class c: TP 0, FP 0, FN 1 -> F1 0
    # macro over the label list: (2/3 + 2/3 + 0) / 3 = 4/9; accuracy 2/4
    result = classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "zzz"], ["a", "b", "c"])
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(4 / 9)


def test_out_of_list_prediction_is_wrong_and_not_a_class():
    # Both predictions are out of list: never right. a: F1 0 (no TP), b: F1 0 -> 0, accuracy 0.
    result = classification_metrics(["a", "b"], ["zzz", "zzz"], ["a", "b"])
    assert result == {"accuracy": 0.0, "f1": 0.0}
    # one right, one out of list: a: TP 1, FN 0, FP 0 -> 1; b: FN 1 -> 0; macro 1/2 (a class -1
    # in the mean would make it 1/3)
    result = classification_metrics(["a", "b"], ["a", "zzz"], ["a", "b"])
    assert result["f1"] == pytest.approx(1 / 2)
    assert result["accuracy"] == pytest.approx(1 / 2)


def test_labels_absent_everywhere_still_count_in_the_macro_mean():
    # golds a b, preds a b, labels a b c d: a and b F1 1, c and d F1 0 -> (1 + 1 + 0 + 0) / 4
    result = classification_metrics(["a", "b"], ["a", "b"], ["a", "b", "c", "d"])
    assert result["f1"] == pytest.approx(0.5)
    assert result["accuracy"] == pytest.approx(1.0)


def test_classification_strips_golds_and_predictions():
    result = classification_metrics([" comedy\n"], ["  comedy "], ["comedy", "action"])
    assert result["accuracy"] == 1.0


def test_gold_outside_label_list_is_an_error():
    with pytest.raises(PerpcsError, match="not one of"):
        classification_metrics(["nope"], ["a"], ["a", "b"])


# ---- regression -----------------------------------------------------------------------------

def test_farther_extreme_rule():
    assert parse_rating("abc", 2.0) == 5.0   # |5-2| = 3 > |1-2| = 1
    assert parse_rating("x", 4.0) == 1.0     # |1-4| = 3 > |5-4| = 1
    assert parse_rating("", 3.0) == 5.0      # tie: 5, as LaMP
    assert parse_rating("nan", 2.0) == 5.0   # not a finite number: treated as unparsable
    assert parse_rating(" 4.5 ", 1.0) == 4.5


def test_mae_rmse_by_hand():
    # errors: gold 2 pred abc -> 5: +3; gold 4 pred x -> 1: -3; gold 3 pred 3: 0; gold 5 pred 4.5: -0.5
    # MAE = (3 + 3 + 0 + 0.5) / 4 = 1.625; RMSE = sqrt((9 + 9 + 0 + 0.25) / 4) = sqrt(4.5625)
    result = regression_metrics(["2", "4", "3", "5"], ["abc", "x", " 3 ", "4.5"])
    assert result["MAE"] == pytest.approx(1.625)
    assert result["RMSE"] == pytest.approx(math.sqrt(4.5625))


def test_regression_gold_not_a_number_is_an_error():
    with pytest.raises(PerpcsError, match="not a number"):
        regression_metrics(["five"], ["5"])


# ---- generation -----------------------------------------------------------------------------

def test_rouge_by_hand():
    # pair 1: gold 4 words, pred the same 4 words reversed plus "extra" (5 words)
    #   ROUGE-1: overlap 4 -> P 4/5, R 4/4 -> F 2*(4/5)/(9/5) = 8/9
    #   ROUGE-L: LCS of a reversed sequence is 1 word -> P 1/5, R 1/4 -> F 2*(1/20)/(9/20) = 2/9
    # pair 2: case and punctuation are dropped by the tokenizer -> identical -> 1 and 1
    golds = ["red green blue yellow", "Hello, World!"]
    preds = ["yellow blue green red extra", "hello world"]
    result = generation_metrics(golds, preds)
    assert result["rouge-1"] == pytest.approx((8 / 9 + 1) / 2)
    assert result["rouge-L"] == pytest.approx((2 / 9 + 1) / 2)


def test_rouge_does_not_stem():
    # with a stemmer, running/run and dogs/dog would match
    result = generation_metrics(["running dogs"], ["run dog"])
    assert result == {"rouge-1": 0.0, "rouge-L": 0.0}


# ---- pairing by id --------------------------------------------------------------------------

def test_evaluate_task_pairs_by_id_not_by_order():
    task = get_task("LaMP_2M")
    golds = lamp("LaMP_2M", [(1, "comedy"), (2, "action"), (3, "classic")])
    # predictions in another order, ids as strings: still paired correctly -> all right
    preds = lamp("LaMP_2M", [("3", "classic"), ("1", "comedy"), ("2", "action")])
    assert evaluate_task(golds, preds, task)["accuracy"] == 1.0


def test_mismatched_ids_are_listed():
    task = get_task("product_rating")
    golds = lamp("LaMP_3", [("a1", "3"), ("a2", "4"), ("a3", "5")])
    preds = lamp("LaMP_3", [("a1", "3"), ("b9", "4")])
    with pytest.raises(PerpcsError) as err:
        evaluate_task(golds, preds, task)
    message = str(err.value)
    assert "2 gold id(s)" in message and "'a2'" in message and "'a3'" in message
    assert "1 predicted id(s)" in message and "'b9'" in message


def test_many_missing_ids_show_ten_and_a_count():
    task = get_task("product_rating")
    golds = lamp("LaMP_3", [(f"q{i:02d}", "3") for i in range(15)])
    preds = lamp("LaMP_3", [("q00", "3")])
    with pytest.raises(PerpcsError) as err:
        evaluate_task(golds, preds, task)
    message = str(err.value)
    assert "14 gold id(s)" in message and "(4 more)" in message
    assert "'q10'" in message and "'q11'" not in message


def test_duplicate_ids_are_an_error():
    task = get_task("news_headline")
    golds = lamp("LaMP_4", [("1", "a b"), ("2", "c d")])
    preds = lamp("LaMP_4", [("1", "a b"), ("2", "c d"), ("2", "c d")])
    with pytest.raises(PerpcsError, match="'2' appears more than once"):
        evaluate_task(golds, preds, task)


def test_bad_gold_is_named_by_id():
    task = get_task("citation")
    golds = lamp("LaMP_1", [("x7", "[3]")])
    preds = lamp("LaMP_1", [("x7", "[1]")])
    with pytest.raises(PerpcsError, match="id 'x7'"):
        evaluate_task(golds, preds, task)


# ---- the script -----------------------------------------------------------------------------

def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def test_script_writes_metrics(tmp_path):
    golds = write(tmp_path / "golds.json", lamp("LaMP_3", [("1", "2"), ("2", "4")]))
    preds = write(tmp_path / "preds.json", lamp("LaMP_3", [("2", "4"), ("1", "oops")]))
    out = tmp_path / "sub" / "result.json"
    proc = run_script("--golds_json", golds, "--preds_json", preds, "--task_name", "product_rating",
                      "--output_file", str(out))
    assert proc.returncode == 0, proc.stderr
    # errors: gold 2 pred oops -> 5: 3; gold 4 pred 4: 0 -> MAE 1.5, RMSE sqrt(9/2)
    written = json.loads(out.read_text())
    assert written["MAE"] == pytest.approx(1.5)
    assert written["RMSE"] == pytest.approx(math.sqrt(4.5))
    assert "MAE" in proc.stdout


def test_script_mismatch_exits_2_naming_ids(tmp_path):
    golds = write(tmp_path / "golds.json", lamp("LaMP_2M", [("101", "comedy"), ("102", "action")]))
    preds = write(tmp_path / "preds.json", lamp("LaMP_2M", [("101", "comedy"), ("999", "action")]))
    out = tmp_path / "result.json"
    proc = run_script("--golds_json", golds, "--preds_json", preds, "--task_name", "LaMP_2M",
                      "--output_file", str(out))
    assert proc.returncode == 2
    assert "'102'" in proc.stderr and "'999'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_script_unknown_task_exits_2(tmp_path):
    golds = write(tmp_path / "golds.json", lamp("LaMP_9", [("1", "x")]))
    proc = run_script("--golds_json", golds, "--preds_json", golds, "--task_name", "LaMP_9")
    assert proc.returncode == 2
    assert "unknown task 'LaMP_9'" in proc.stderr


def test_script_main_callable_in_process(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("eval_task_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = module.main
    golds = write(tmp_path / "golds.json", lamp("LaMP_7", [("1", "red green blue yellow")]))
    preds = write(tmp_path / "preds.json", lamp("LaMP_7", [("1", "yellow blue green red extra")]))
    metrics = main(["--golds_json", golds, "--preds_json", preds, "--task_name", "tweet_paraphrase"])
    assert metrics["rouge-1"] == pytest.approx(8 / 9)  # same pair as test_rouge_by_hand
    assert "rouge-L" in capsys.readouterr().out


def test_file_of_another_task_warns(capsys):
    golds = lamp("LaMP_2N", [("1", "comedy")])
    preds = lamp("LaMP_2M", [("1", "comedy")])
    assert evaluate_task(golds, preds, get_task("movie_tagging"))["accuracy"] == 1.0
    assert "golds says task 'LaMP_2N'" in capsys.readouterr().err
