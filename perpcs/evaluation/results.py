"""The results table of every task in the layout of the paper's main table (``eval/eval_all.py``).

Rows are methods, each with its test-time variants; columns are the seven LaMP tasks in the paper's order, two
LaMP metrics each (accuracy / F1, MAE / RMSE, ROUGE-1 / ROUGE-L). The variants of every method are the files
every stage writes: no retrieval (``kNP``), BM25 top-k (``k<k>``, RAG), the profile alone (``kNP-profile``, PAG
k=0) and profile + BM25 top-k (``k<k>-profile``, PAG), for each k the run has (the k of any file found).

    Base model (no LoRA)              base_LLM/predictions/             (task_LoRA.py --base_only)
    Non-personalized / RAG / PAG      task-base_LLM/predictions/        (the task LoRA, shared by all users)
    PEFT retrieval (nearest sharer)   LoRA-Composition-control-nearest_sharer/predictions/
    PEFT retrieval (random sharer)    LoRA-Composition-control-random_sharer/predictions/
    OPPU                              OPPU/predictions/                  (one trained LoRA per user)
    Per-Pcs                           LoRA-Composition/predictions/      (one assembled LoRA per user)
    Per-Pcs (LoRA-Composition-x)      any other LoRA-Composition-*/ dir (ablations, user-blind controls)

The rows of the first six methods are always in the table: a cell whose predictions file does not exist is
marked "–" (not run), never filled. A file whose outputs are all empty is marked "empty" (with a warning: a run
that generated nothing is not scored as if it were a result). The rows of the other LoRA-Composition-*/ dirs are
listed only for the variants they have a file of. Every file is scored against ``data/<task>/test_100/golds.json``
with the LaMP metrics of ``perpcs.evaluation.metrics``.
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
from perpcs.paths import BASE_ONLY, COMPOSITION, OPPU, TASK_LORA, control_dir_name

# Column order: the seven tasks in the order of the paper's table (LaMP ids in the header).
TASK_ORDER = list(TASKS)   # LaMP's order, as the task table lists them
# metric key of perpcs.metrics -> (column name, higher is better)
METRIC_NAMES = {"accuracy": ("Acc", True), "f1": ("F1", True), "MAE": ("MAE", False), "RMSE": ("RMSE", False),
                "rouge-1": ("ROUGE-1", True), "rouge-L": ("ROUGE-L", True)}
TASK_METRICS = {"classification": ["accuracy", "f1"], "regression": ["MAE", "RMSE"],
                "generation": ["rouge-1", "rouge-L"]}
VARIANT_RE = re.compile(r"^k(NP|[1-9]\d*)(-profile)?$")   # k0 / k01 would share a row with kNP / k1

NOT_RUN = "–"          # a cell whose predictions file does not exist
EMPTY = "empty"        # a cell whose predictions file has only empty outputs

# the PEFT-retrieval baselines: stage 5 --control nearest_sharer / random_sharer (a sharer's LoRA as the user's)
NEAREST_SHARER_DIR = control_dir_name("nearest_sharer")
RANDOM_SHARER_DIR = control_dir_name("random_sharer")
BASE_MODEL = "Base model (no LoRA)"
TASK_LORA_METHOD = "task LoRA"     # its rows are labelled Non-personalized / RAG / PAG, as in the paper
NEAREST_SHARER = "PEFT retrieval (nearest sharer)"
RANDOM_SHARER = "PEFT retrieval (random sharer)"
# (method, run dir under output/<task>/): the paper's methods, in row order; their rows are always in the table
PAPER_METHODS = [(BASE_MODEL, BASE_ONLY), (TASK_LORA_METHOD, TASK_LORA), (NEAREST_SHARER, NEAREST_SHARER_DIR),
                 (RANDOM_SHARER, RANDOM_SHARER_DIR), ("OPPU", OPPU), ("Per-Pcs", COMPOSITION)]
TASK_LORA_LABELS = ("Non-personalized", "RAG", "PAG")


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


def variant_stems(ks) -> list:
    """Every variant file of a run with retrieval depths ``ks``, in row order: kNP, k<k>..., kNP-profile,
    k<k>-profile... (what each stage writes for its --k_list)."""
    plain = ["kNP"] + [f"k{k}" for k in sorted(set(ks))]
    return plain + [f"{stem}-profile" for stem in plain]


def row_label(method: str, stem: str) -> tuple:
    """(method column, setting column) of one predictions file."""
    k, with_profile = parse_variant(stem)
    if method == TASK_LORA_METHOD:   # the task LoRA baselines have names of their own
        if with_profile:
            return "PAG", f"k={k}"
        return ("RAG", f"k={k}") if k else ("Non-personalized", "")
    if with_profile:
        return method, f"+PAG k={k}"
    return method, (f"+RAG k={k}" if k else "")


def extra_method_dirs(task_root: Path) -> list:
    """(method name, run dir) of the LoRA-Composition-*/ dirs that are not a method of the paper (ablation runs,
    user-blind controls), by dir name."""
    paper_dirs = {sub for _, sub in PAPER_METHODS}
    extra = sorted(p for p in task_root.glob(f"{COMPOSITION}-*") if p.is_dir() and p.name not in paper_dirs)
    return [(f"Per-Pcs ({p.name})", p) for p in extra]


def method_dirs(task_root: Path) -> list:
    """(method name, run dir) of every method with a predictions dir under output/<task>/, in table order."""
    found = [(name, task_root / sub) for name, sub in PAPER_METHODS] + extra_method_dirs(task_root)
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
    files: int = 0                                # how many predictions files were found (scored or empty)

    def columns(self) -> list:
        """(task, metric key) per numeric column."""
        return [(task, key) for task in self.tasks for key in TASK_METRICS[task.metric]]

    def value(self, row: tuple, task: Task, key: str):
        return self.scores.get(row, {}).get(task.name, {}).get(key)

    def mark(self, row: tuple, task: Task) -> str | None:
        """"empty" or "–" for a cell that holds no score, None for a scored one."""
        if (row, task.name) in self.empty:
            return EMPTY
        return None if task.name in self.scores.get(row, {}) else NOT_RUN


def collect_results(output_root="output", data_dir="data") -> ResultsTable:
    """Score every predictions file of every task under output_root; the paper's rows for the k's found."""
    table = ResultsTable([TASKS[n] for n in TASK_ORDER])
    ks, extra_rows = set(), {}     # retrieval depths found; (method, stem) of the other dirs' files
    for task in table.tasks:
        task_root = Path(output_root) / task.name
        methods = method_dirs(task_root) if task_root.is_dir() else []
        if not any(prediction_files(d / "predictions") for _, d in methods):
            continue
        golds = Layout(data_dir, task).load_golds()
        for method, run_dir in methods:
            empty = []
            scores = score_prediction_dir(run_dir / "predictions", golds, task, empty)
            for stem in list(scores) + empty:
                row = row_label(method, stem)
                table.files += 1
                ks.add(parse_variant(stem)[0])
                if method not in dict(PAPER_METHODS):
                    extra_rows[row] = (method, variant_order(stem))
                if stem in scores:
                    table.scores.setdefault(row, {})[task.name] = scores[stem]
                else:
                    table.empty.add((row, task.name))
    ks.discard(0)
    table.rows = [row_label(method, stem) for method, _ in PAPER_METHODS for stem in variant_stems(ks)]
    table.rows += sorted(extra_rows, key=lambda row: extra_rows[row])
    return table


def method_of_row(row: tuple) -> str:
    """The method a row belongs to (the task LoRA's rows are labelled Non-personalized / RAG / PAG)."""
    return TASK_LORA_METHOD if row[0] in TASK_LORA_LABELS else row[0]


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
    mark = table.mark(row, task)
    if mark is not None:
        return mark
    value = table.value(row, task, key)
    text = f"{value:.3f}"
    return bold(text) if best.get((task.name, key)) == value else text


LEGEND = (f"{NOT_RUN} not run (no predictions file); {EMPTY}: every output of the predictions file is empty (not "
          "scored). Acc/F1: LaMP's accuracy and macro-F1; MAE/RMSE: LaMP-3's errors; ROUGE-1/ROUGE-L: F-measure. "
          "RAG: BM25 top-k history items in the prompt; PAG: the user's profile text + the top-k items (k=0: the "
          "profile only). PEFT retrieval: one sharer's whole LoRA per user, the nearest by history embedding or one "
          "drawn at random (stage 5 --control nearest_sharer / random_sharer).")


def to_markdown(table: ResultsTable) -> str:
    columns = table.columns()
    best = best_rows(table)
    lines = ["| Method | Setting | " + " | ".join(_header(t, k) for t, k in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for row in table.rows:
        cells = [_cell(table, row, t, k, best, lambda s: f"**{s}**") for t, k in columns]
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(cells) + " |")
    note = f"\n↑ higher is better, ↓ lower is better; bold: best in the column; {LEGEND}\n"
    return "\n".join(lines) + "\n" + note


def to_csv(table: ResultsTable) -> str:
    """Full precision; "–" where not run, "empty" where every output was (the same marks as the other formats)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = table.columns()
    writer.writerow(["method", "setting"] + [f"{_task_title(t)} {METRIC_NAMES[k][0]}" for t, k in columns])
    for row in table.rows:
        writer.writerow(list(row) + [table.mark(row, t) or repr(table.value(row, t, k)) for t, k in columns])
    return buffer.getvalue()


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: ResultsTable) -> str:
    """A booktabs table: one column group per task (two metrics each), a rule between methods, the legend in
    the last row."""
    columns = table.columns()
    best = best_rows(table)
    width = 2 + len(columns)
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
        if previous is not None and method_of_row(row) != method_of_row(previous):   # a rule between methods
            lines.append(r"\midrule")
        method = _latex_escape(row[0]) if previous is None or row[0] != previous[0] else ""
        cells = [_cell(table, row, t, k, best, lambda s: rf"\textbf{{{s}}}") for t, k in columns]
        lines.append(f"{method} & {_latex_escape(row[1])} & " + " & ".join(cells) + r" \\")
        previous = row
    lines += [r"\bottomrule",
              rf"\multicolumn{{{width}}}{{@{{}}p{{\linewidth}}@{{}}}}{{\footnotesize $\uparrow$ higher is better, "
              rf"$\downarrow$ lower is better; bold: best in the column; {_latex_escape(LEGEND)}}} \\",
              r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_results(output_root="output", data_dir="data", out_prefix="output/results") -> dict:
    """Score everything and write <prefix>.md, .csv and .tex (each atomically); returns {format: path}."""
    table = collect_results(output_root, data_dir)
    if not table.files:
        fail(f"no prediction files under {output_root}/<task>/{{{BASE_ONLY},{TASK_LORA},{OPPU},{COMPOSITION}*}}"
             "/predictions/")
    paths = {}
    for suffix, render in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
        path = Path(f"{out_prefix}.{suffix}")
        write_bytes_atomic(path, render(table).encode("utf-8"))
        paths[suffix] = path
    return paths
