"""Score every prediction file under output/ and write one results table in the layout of the paper's main
table: rows = the methods with their test-time variants (base model without LoRA; the task LoRA as
Non-personalized / RAG k / PAG k; PEFT retrieval, nearest and random sharer; OPPU; Per-Pcs; then any other
LoRA-Composition-*/ dir of an ablation or control), columns = the seven LaMP tasks x their two metrics;
"–" where a run did not produce the file, "empty" where every output of the file is empty.

    python eval/eval_all.py [--output_root output] [--data_dir data] [--out_prefix output/results]

Writes <out_prefix>.md, <out_prefix>.csv and <out_prefix>.tex.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perpcs.errors import run_cli  # noqa: E402
from perpcs.evaluation.results import write_results  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_root", default="output",
                        help="holds <task>/{base_LLM,task-base_LLM,OPPU,LoRA-Composition*}/")
    parser.add_argument("--data_dir", default="data", help="holds <task>/test_100/golds.json")
    parser.add_argument("--out_prefix", default="output/results", help="writes <prefix>.md, .csv and .tex")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    paths = write_results(args.output_root, args.data_dir, args.out_prefix)
    print(paths["md"].read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return paths


if __name__ == "__main__":
    run_cli(main)
