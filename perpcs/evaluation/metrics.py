"""LaMP metrics (docs/method.md section 8): accuracy / macro-F1, MAE / RMSE, ROUGE-1 / ROUGE-L.

LaMP's official evaluation computes these with the ``evaluate`` package, whose ``evaluate.load``
fetches metric scripts from a hub at run time; scikit-learn and rouge-score give the same numbers
offline (ROUGE is averaged over examples here, without evaluate's bootstrap aggregation).
"""
from __future__ import annotations

import math
import sys

from perpcs.data.layout import outputs_by_id, read_json
from perpcs.data.tasks import Task, get_task
from perpcs.errors import fail

OUT_OF_LIST = -1  # class of a prediction that is not in the label list: never equal to a gold class


def classification_metrics(golds: list, preds: list, labels: list) -> dict:
    """Accuracy and macro-F1 over ``labels`` only; an out-of-list prediction is always wrong."""
    from sklearn.metrics import accuracy_score, f1_score  # imported here: slow, and only this metric needs it

    _check_lengths(golds, preds)
    index = {label.strip(): i for i, label in enumerate(labels)}
    gold_classes = []
    for position, gold in enumerate(golds):
        if gold.strip() not in index:
            fail(f"gold #{position} {gold!r} is not one of the task's labels: {', '.join(labels)}")
        gold_classes.append(index[gold.strip()])
    pred_classes = [index.get(pred.strip(), OUT_OF_LIST) for pred in preds]
    # A label absent from both golds and predictions scores F1 0 and still counts in the macro mean
    # (as LaMP's evaluation does); zero_division=0 only silences sklearn's warning about it.
    f1 = f1_score(gold_classes, pred_classes, labels=list(range(len(labels))), average="macro",
                  zero_division=0)
    return {"accuracy": float(accuracy_score(gold_classes, pred_classes)), "f1": float(f1)}


def parse_rating(pred: str, gold: float) -> float:
    """The predicted number, or 1 or 5, whichever is farther from the gold (a tie gives 5, as LaMP)."""
    try:
        value = float(pred.strip())
    except ValueError:
        value = math.nan
    if math.isfinite(value):
        return value
    return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


def regression_metrics(golds: list, preds: list) -> dict:
    """MAE and RMSE; golds must be numbers, unparsable predictions get the farther extreme."""
    _check_lengths(golds, preds)
    errors = []
    for position, (gold, pred) in enumerate(zip(golds, preds)):
        if not _is_number(gold):
            fail(f"gold #{position} {gold!r} is not a number")
        gold_value = float(gold.strip())
        errors.append(parse_rating(pred, gold_value) - gold_value)
    return {"MAE": sum(abs(e) for e in errors) / len(errors),
            "RMSE": math.sqrt(sum(e * e for e in errors) / len(errors))}


def generation_metrics(golds: list, preds: list) -> dict:
    """ROUGE-1 and ROUGE-L F-measure (no stemming), the plain mean over examples."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_lengths(golds, preds)
    scorer = RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(gold, pred) for gold, pred in zip(golds, preds)]  # (target, prediction)
    return {"rouge-1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
            "rouge-L": sum(s["rougeL"].fmeasure for s in scores) / len(scores)}


def _check_lengths(golds: list, preds: list) -> None:
    if len(golds) != len(preds):
        fail(f"{len(golds)} golds but {len(preds)} predictions")
    if not golds:
        fail("no examples to evaluate")


def _id_sample(ids: set) -> str:
    ordered = sorted(ids)
    more = f", ... ({len(ordered) - 10} more)" if len(ordered) > 10 else ""
    return ", ".join(repr(i) for i in ordered[:10]) + more


def check_same_ids(golds: dict, preds: dict, golds_name: str, preds_name: str) -> None:
    missing = set(golds) - set(preds)
    extra = set(preds) - set(golds)
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} gold id(s) have no prediction in {preds_name}: {_id_sample(missing)}")
    if extra:
        parts.append(f"{len(extra)} predicted id(s) are not in {golds_name}: {_id_sample(extra)}")
    fail("gold and predicted ids differ; " + "; ".join(parts))


def _warn_if_other_task(lamp: dict, task: Task, what: str) -> None:
    named = lamp.get("task")
    if isinstance(named, str) and named not in (task.lamp_id, task.name):
        print(f"warning: {what} says task {named!r} but it is evaluated as {task.lamp_id}", file=sys.stderr)


EMPTY_CAUSES = ("nothing was generated. Likely causes: a nan or out-of-range setting that older versions accepted "
                "(--agg_temperature nan made every recipe weight nan), an adapter that diverged, or a model that "
                "ends every answer at once")


def all_empty(preds_json: dict, preds_name: str = "predictions") -> int:
    """The number of outputs when every one of them is empty (or blank), else 0."""
    outputs = outputs_by_id(preds_json, preds_name)
    return len(outputs) if outputs and not any(o.strip() for o in outputs.values()) else 0


def empty_message(preds_name: str, n: int) -> str:
    return f"{preds_name}: every one of the {n} outputs is empty; {EMPTY_CAUSES}"


def evaluate_task(golds_json: dict, preds_json: dict, task: Task, golds_name: str = "golds",
                  preds_name: str = "predictions", allow_empty: bool = False, empty_hint: str = "") -> dict:
    """Metrics of LaMP-format predictions against LaMP-format golds, paired by id.

    A file whose outputs are all empty is refused (unless ``allow_empty``): its metrics would be a number (an
    MAE, a zero accuracy) for a run that predicted nothing, and would pass for a result. ``empty_hint``: how the
    caller's user scores it anyway."""
    golds = outputs_by_id(golds_json, golds_name)
    preds = outputs_by_id(preds_json, preds_name)
    check_same_ids(golds, preds, golds_name, preds_name)
    n_empty = all_empty(preds_json, preds_name)
    if n_empty and not allow_empty:
        fail(empty_message(preds_name, n_empty) + (f"; {empty_hint}" if empty_hint else ""))
    for lamp, what in ((golds_json, golds_name), (preds_json, preds_name)):
        _warn_if_other_task(lamp, task, what)
    _check_golds(golds, task, golds_name)
    ids = sorted(golds)
    gold_list, pred_list = [golds[i] for i in ids], [preds[i] for i in ids]
    if task.metric == "classification":
        return classification_metrics(gold_list, pred_list, list(task.labels))
    if task.metric == "regression":
        return regression_metrics(gold_list, pred_list)
    if task.metric == "generation":
        return generation_metrics(gold_list, pred_list)
    fail(f"task {task.name}: unknown metric {task.metric!r}")


def _check_golds(golds: dict, task: Task, golds_name: str) -> None:
    """Name a bad gold by its id (the metric functions only know positions)."""
    labels = {label.strip() for label in task.labels}
    for key, gold in golds.items():
        if task.metric == "classification" and gold.strip() not in labels:
            fail(f"{golds_name}: id {key!r}: gold {gold!r} is not one of the {task.lamp_id} labels: "
                 f"{', '.join(task.labels)}")
        if task.metric == "regression" and not _is_number(gold):
            fail(f"{golds_name}: id {key!r}: gold {gold!r} is not a number")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text.strip()))
    except ValueError:
        return False


def evaluate_files(golds_path, preds_path, task_name: str, allow_empty: bool = False, empty_hint: str = "") -> dict:
    task = get_task(task_name)
    golds = read_json(golds_path, "golds file")
    preds = read_json(preds_path, "predictions file")
    return evaluate_task(golds, preds, task, golds_name=str(golds_path), preds_name=str(preds_path),
                         allow_empty=allow_empty, empty_hint=empty_hint)
