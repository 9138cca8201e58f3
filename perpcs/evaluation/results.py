"""The results table of every task in the layout of the paper's main table (``eval/eval_all.py``).

Rows are methods and their test-time variants, columns are tasks x their two metrics:

    Non-personalized      task LoRA, no retrieval                 task-base_LLM/predictions/kNP.json
    RAG (k=n)             task LoRA, BM25 top-n                   .../kn.json
    PAG (k=n)             task LoRA, profile + BM25 top-n         .../kn-profile.json (k=0: profile only)
    OPPU, OPPU + RAG ...  one trained LoRA per user               OPPU/predictions/...
    Per-Pcs, ...          assembled LoRA per user                 LoRA-Composition/predictions/...
    Per-Pcs (LoRA-Composition-x) ...  any other LoRA-Composition-*/ dir (ablation runs), named after the dir

Every prediction file is scored against ``data/<task>/test_100/golds.json`` with the LaMP metrics; a missing
file leaves "-" in its cell, a file whose outputs are all empty "empty" (with a warning: a run that generated
nothing is not scored as if it were a result), and a row with no file in any task is left out.
"""
from __future__ import annotations

import csv
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from perpcs.atomic import write_bytes_atomic
from perpcs.data.layout import Layout, read_json
from perpcs.data.tasks import TASKS, Task
from perpcs.errors import fail
from perpcs.evaluation.metrics import all_empty, empty_message, evaluate_task
from perpcs.paths import COMPOSITION, OPPU, TASK_LORA

# Column order: the paper's six tasks, LaMP-2N (the authors' OPPU work) beside LaMP-2M when present.
TASK_ORDER = ["citation", "movie_tagging", "news_categorize", "product_rating", "news_headline",
              "scholarly_title", "tweet_paraphrase"]
OPTIONAL_TASKS = {"news_categorize"}
# metric key of perpcs.metrics -> (column name, higher is better)
METRIC_NAMES = {"accuracy": ("Acc", True), "f1": ("F1", True), "MAE": ("MAE", False), "RMSE": ("RMSE", False),
                "rouge-1": ("ROUGE-1", True), "rouge-L": ("ROUGE-L", True)}
TASK_METRICS = {"classification": ["accuracy", "f1"], "regression": ["MAE", "RMSE"],
                "generation": ["rouge-1", "rouge-L"]}
VARIANT_RE = re.compile(r"^k(NP|[1-9]\d*)(-profile)?$")   # k0 / k01 would share a row with kNP / k1
MAIN_METHOD_DIRS = [("task LoRA", TASK_LORA), ("OPPU", OPPU), ("Per-Pcs", COMPOSITION)]


def parse_variant(stem: str):
    """'kNP' -> (0, False), 'k4-profile' -> (4, True); None for a name that is not a variant file."""
    match = VARIANT_RE.match(stem)
    if not match:
        return None
    k = 0 if match.group(1) == "NP" else int(match.group(1))
    return k, bool(match.group(2))


def variant_order(stem: str) -> tuple:
    """No retrieval, RAG by k, then PAG (profile) by k: the row order of the paper's table."""
    k, with_profile = parse_variant(stem)
    return (with_profile, k)


def row_label(method: str, stem: str) -> tuple:
    """(method column, setting column) of one predictions file."""
    k, with_profile = parse_variant(stem)
    if method == "task LoRA":   # the baselines have names of their own
        if with_profile:
            return "PAG", f"k={k}"
        return ("RAG", f"k={k}") if k else ("Non-personalized", "")
    if with_profile:
        return method, f"+PAG k={k}"
    return method, (f"+RAG k={k}" if k else "")


def method_dirs(task_root: Path) -> list:
    """(method name, run dir) of every method found under output/<task>/, in table order."""
    found = [(name, task_root / sub) for name, sub in MAIN_METHOD_DIRS]
    extra = sorted(p for p in task_root.glob(f"{COMPOSITION}-*") if p.is_dir())
    found += [(f"Per-Pcs ({p.name})", p) for p in extra]
    return [(name, d) for name, d in found if (d / "predictions").is_dir()]


def prediction_files(pred_dir: Path) -> list:
    """The variant files of a predictions dir, in row order; other JSON files are named and skipped."""
    files = []
    for path in sorted(Path(pred_dir).glob("*.json")):
        if parse_variant(path.stem) is None:
            print(f"note: {path} is not a variant file (kNP, k<n>, with -profile); skipped", file=sys.stderr)
        else:
            files.append(path)
    return sorted(files, key=lambda p: variant_order(p.stem))


def score_prediction_dir(pred_dir: Path, golds: dict, task: Task, empty: list | None = None) -> dict:
    """{variant stem: metrics} of every variant file in a predictions dir. A file whose outputs are all empty is
    an error (evaluate_task); given a list ``empty``, its stem goes there instead, with a warning."""
    scores = {}
    for path in prediction_files(pred_dir):
        preds = read_json(path, "predictions file")
        n_empty = all_empty(preds, str(path)) if empty is not None else 0
        if n_empty:
            print(f"warning: {empty_message(str(path), n_empty)}; marked 'empty' in the table, not scored",
                  file=sys.stderr)
            empty.append(path.stem)
            continue
        scores[path.stem] = evaluate_task(golds, preds, task, golds_name="golds", preds_name=str(path))
    return scores


@dataclass
class ResultsTable:
    tasks: list                                   # Task objects, column order
    rows: list = field(default_factory=list)      # (method, setting) in row order
    scores: dict = field(default_factory=dict)    # (method, setting) -> {task name: {metric: value}}
    empty: set = field(default_factory=set)       # (row, task name) whose predictions are all empty

    def columns(self) -> list:
        """(task, metric key) per numeric column."""
        return [(task, key) for task in self.tasks for key in TASK_METRICS[task.metric]]

    def value(self, row: tuple, task: Task, key: str):
        return self.scores.get(row, {}).get(task.name, {}).get(key)


def collect_results(output_root="output", data_dir="data") -> ResultsTable:
    """Score every predictions file of every task under output_root."""
    per_task = {}      # task name -> [(row, metrics)]
    for name in TASK_ORDER:
        task = TASKS[name]
        task_root = Path(output_root) / name
        methods = method_dirs(task_root) if task_root.is_dir() else []
        if not any(prediction_files(d / "predictions") for _, d in methods):
            continue
        golds = Layout(data_dir, task).load_golds()
        per_task[name] = []
        for method, run_dir in methods:
            empty = []
            scores = score_prediction_dir(run_dir / "predictions", golds, task, empty)
            per_task[name] += [(row_label(method, stem), metrics) for stem, metrics in scores.items()]
            per_task[name] += [(row_label(method, stem), None) for stem in empty]
    tasks = [TASKS[n] for n in TASK_ORDER if n not in OPTIONAL_TASKS or n in per_task]
    table = ResultsTable(tasks)
    for name, rows in per_task.items():
        for row, metrics in rows:
            if metrics is None:
                table.scores.setdefault(row, {})
                table.empty.add((row, name))
            else:
                table.scores.setdefault(row, {})[name] = metrics
    table.rows = sorted(table.scores, key=row_order)
    return table


METHOD_ORDER = ["Non-personalized", "RAG", "PAG", "OPPU", "Per-Pcs"]


def row_order(row: tuple) -> tuple:
    """Baselines, OPPU, Per-Pcs, then ablation runs by dir name; variants by (profile, k) in a method."""
    method, setting = row
    rank = (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)
    return rank + _setting_key(setting)


def _setting_key(setting: str) -> tuple:
    """'' < k=n / +RAG k=n (by n) < PAG / +PAG k=n (by n)."""
    match = re.search(r"k=(\d+)", setting)
    k = int(match.group(1)) if match else -1
    return ("PAG" in setting, k)


# ---- formatting ------------------------------------------------------------------------------------

def _task_title(task: Task) -> str:
    return task.lamp_id.replace("_", "-")


def _header(task: Task, key: str) -> str:
    name, higher = METRIC_NAMES[key]
    return f"{_task_title(task)} {name} {'↑' if higher else '↓'}"


def best_rows(table: ResultsTable) -> dict:
    """(task name, metric) -> the best value of that column (highest, or lowest for MAE/RMSE)."""
    best = {}
    for task, key in table.columns():
        values = [v for v in (table.value(r, task, key) for r in table.rows) if v is not None]
        if values:
            best[(task.name, key)] = max(values) if METRIC_NAMES[key][1] else min(values)
    return best


def _cell(table, row, task, key, best, bold) -> str:
    value = table.value(row, task, key)
    if (row, task.name) in table.empty:
        return "empty"
    if value is None:
        return "-"
    text = f"{value:.3f}"
    return bold(text) if best.get((task.name, key)) == value else text


def to_markdown(table: ResultsTable) -> str:
    columns = table.columns()
    best = best_rows(table)
    lines = ["| Method | Setting | " + " | ".join(_header(t, k) for t, k in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for row in table.rows:
        cells = [_cell(table, row, t, k, best, lambda s: f"**{s}**") for t, k in columns]
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(cells) + " |")
    note = ("\n↑ higher is better, ↓ lower is better; bold: best in the column; -: no predictions file; empty: "
            "every output of the predictions file is empty (not scored). "
            "RAG: BM25 top-k history items; PAG: profile text + top-k items (k=0: the profile only).\n")
    return "\n".join(lines) + "\n" + note


def to_csv(table: ResultsTable) -> str:
    """Full precision, an empty cell where missing, "empty" where every output was (for spreadsheets and scripts)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = table.columns()
    writer.writerow(["method", "setting"] + [f"{_task_title(t)} {METRIC_NAMES[k][0]}" for t, k in columns])
    for row in table.rows:
        values = [table.value(row, t, k) for t, k in columns]
        writer.writerow(list(row) + ["empty" if (row, t.name) in table.empty else "" if v is None else repr(v)
                                     for v, (t, _) in zip(values, columns)])
    return buffer.getvalue()


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _block(method: str) -> str:
    """The task LoRA baselines form one block of the table, every other method its own."""
    return "baselines" if method in METHOD_ORDER[:3] else method


def to_latex(table: ResultsTable) -> str:
    """A booktabs table: one column group per task (two metrics each), as in the paper."""
    columns = table.columns()
    best = best_rows(table)
    lines = [r"\begin{tabular}{ll" + "r" * len(columns) + "}", r"\toprule"]
    groups, rules = [], []
    for i, task in enumerate(table.tasks):
        groups.append(rf"\multicolumn{{2}}{{c}}{{{_task_title(task)}}}")
        rules.append(rf"\cmidrule(lr){{{3 + 2 * i}-{4 + 2 * i}}}")
    lines.append(" & & " + " & ".join(groups) + r" \\")
    lines.append(" ".join(rules))
    metric_heads = [f"{METRIC_NAMES[k][0]} $\\{'uparrow' if METRIC_NAMES[k][1] else 'downarrow'}$"
                    for _, k in columns]
    lines.append("Method & Setting & " + " & ".join(metric_heads) + r" \\")
    lines.append(r"\midrule")
    previous = None
    for row in table.rows:
        if previous is not None and _block(row[0]) != _block(previous):   # a rule between method blocks
            lines.append(r"\midrule")
        method = _latex_escape(row[0]) if row[0] != previous else ""
        cells = [_cell(table, row, t, k, best, lambda s: rf"\textbf{{{s}}}") for t, k in columns]
        lines.append(f"{method} & {_latex_escape(row[1])} & " + " & ".join(cells) + r" \\")
        previous = row[0]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_results(output_root="output", data_dir="data", out_prefix="output/results") -> dict:
    """Score everything and write <prefix>.md, .csv and .tex (each atomically); returns {format: path}."""
    table = collect_results(output_root, data_dir)
    if not table.rows:
        fail(f"no prediction files under {output_root}/<task>/{{task-base_LLM,OPPU,LoRA-Composition*}}/predictions/")
    paths = {}
    for suffix, render in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
        path = Path(f"{out_prefix}.{suffix}")
        write_bytes_atomic(path, render(table).encode("utf-8"))
        paths[suffix] = path
    return paths
