"""Stage 6: LaMP metrics of a predictions file against a golds file (docs/method.md section 8).

    python eval/eval_task.py --golds_json G --preds_json P --task_name LaMP_2M --output_file R
    python eval/eval_task.py --data_dir data --preds_json P --task_name movie_tagging   # golds of the test users

Prints the metrics; with --output_file also writes them there as JSON.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perpcs.data.layout import Layout, read_json  # noqa: E402
from perpcs.atomic import write_json_atomic  # noqa: E402
from perpcs.errors import fail, run_cli  # noqa: E402
from perpcs.evaluation.metrics import evaluate_files, evaluate_task  # noqa: E402
from perpcs.data.tasks import get_task  # noqa: E402


EMPTY_HINT = "to score it all the same, pass --allow_empty"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golds_json", default=None, help="LaMP golds file {task, golds: [{id, output}]}")
    parser.add_argument("--data_dir", default=None,
                        help="when --golds_json is not given or does not exist: the golds of the test users in "
                             "<data_dir>/<task>/test_100/ (golds.json, else their queries' golds)")
    parser.add_argument("--preds_json", required=True, help="LaMP predictions file, same format and ids")
    parser.add_argument("--task_name", required=True,
                        help="LaMP id (LaMP_2M) or project name (movie_tagging)")
    parser.add_argument("--output_file", default=None, help="where to write the metrics JSON (optional)")
    parser.add_argument("--allow_empty", action="store_true",
                        help="score a predictions file whose outputs are all empty (refused by default: such a file "
                             "comes from a run that generated nothing, and its metrics would pass for a result)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.golds_json and (Path(args.golds_json).is_file() or not args.data_dir):
        metrics = evaluate_files(args.golds_json, args.preds_json, args.task_name, allow_empty=args.allow_empty,
                                 empty_hint=EMPTY_HINT)
    elif args.data_dir:
        task = get_task(args.task_name)
        golds = Layout(args.data_dir, task).load_golds()
        metrics = evaluate_task(golds, read_json(args.preds_json, "predictions file"), task,
                                golds_name=f"the test users of {args.data_dir}", preds_name=args.preds_json,
                                allow_empty=args.allow_empty, empty_hint=EMPTY_HINT)
    else:
        fail("give --golds_json, or --data_dir to take the golds of the test users")
    print(json.dumps(metrics, indent=1))
    if args.output_file:
        write_json_atomic(args.output_file, metrics)
        print(f"metrics written to {args.output_file}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
