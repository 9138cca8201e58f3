"""Scale benchmark (CPU): wall time and peak RSS of the data steps at LaMP's sizes, and stage-5 RSS per user.

Generated data with a realistic vocabulary (a Zipf-like draw from tens of thousands of distinct words; product
reviews of ~100 words, heavy-tailed history lengths), in LaMP's raw format (``*_questions.json`` +
``*_outputs.json``, the time-based layout: a user's questions see growing prefixes of one history). Every
measurement runs in its own process (peak RSS = that process's ``ru_maxrss``; the process's RSS right after its
imports is reported beside it as ``base``):

  prepare    prepare_lamp on --questions questions (target <= 120 s, <= 4 GB)
  user N     one user's stage 4/5 history examples (data.prompts.history_examples, with the profile text and
             the BM25 top-1 per item) at N = --user_sizes items (target at 2,000: <= 10 s, <= 1 GB)
  variants   the test examples of --variant_users users x 8 variants (engine.generation.all_variant_examples)
  stage5     stage 5 (stages.lora_composition.compose) on the tiny random Llama over --stage5_users test users of
             --stage5_history items each; RSS sampled after every user (target: flat from user 1 to the last)

    OMP_NUM_THREADS=1 python bench/bench_scale.py                 # full run (minutes), JSON to --json
    OMP_NUM_THREADS=1 python bench/bench_scale.py --quick         # small smoke run (seconds)
    python bench/bench_scale.py --only prepare,user               # some parts only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASK = "product_rating"
RATING_PROMPT = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
                 "or 5 without further explanation. review: ")
PARTS = ("prepare", "user", "variants", "stage5")
TARGETS = {"prepare_s": 120, "prepare_rss_mb": 4096, "user2000_s": 10, "user2000_rss_mb": 1024}


def log(msg: str) -> None:
    # stderr: a child's stdout carries its JSON result (and stage 5's stdout is captured)
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.__stderr__, flush=True)


def rss_mb() -> float:
    """This process's resident set size now (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


# ------------------------------------------------------------------------------------------------ data

class Words:
    """A vocabulary of ``size`` distinct made-up words drawn with Zipf-like frequencies (p ~ 1 / (rank + 2.7))."""

    def __init__(self, size: int, seed: int):
        import numpy as np
        self.np = np
        self.rng = np.random.default_rng(seed)
        syll = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vi", "do", "pe", "gu", "ha", "zo", "bi", "fa", "we",
                "ti", "mo", "ar", "el", "in", "os", "un", "ys"]
        words, n = [], 0
        while len(words) < size:   # distinct by construction: base-24 digits of n, 2+ syllables
            digits, m = [], n + 24
            while m:
                m, d = divmod(m, len(syll))
                digits.append(syll[d])
            words.append("".join(digits))
            n += 1
        self.vocab = np.array(words, dtype=object)
        weights = 1.0 / (np.arange(size) + 2.7)
        self.cdf = np.cumsum(weights / weights.sum())

    def texts(self, lengths) -> list:
        """One text per length, ``length`` words each."""
        total = int(sum(lengths))
        idx = self.np.minimum(self.np.searchsorted(self.cdf, self.rng.random(total)), len(self.vocab) - 1)
        drawn = self.vocab[idx].tolist()
        out, pos = [], 0
        for n in lengths:
            out.append(" ".join(drawn[pos:pos + n]))
            pos += n
        return out

    def lengths(self, n: int, median: float, cap: int) -> list:
        """Heavy-tailed lengths (lognormal, sigma 0.8: mean ~1.4x the median), at least 5, at most cap."""
        draw = self.rng.lognormal(self.np.log(median), 0.8, n)
        return [int(x) for x in self.np.clip(draw, 5, cap)]


def review_items(words: Words, n: int, word_median: float = 70) -> list:
    """n product reviews {"text", "score"} (no id), ~100 words on average."""
    texts = words.texts(words.lengths(n, word_median, 1500))
    scores = words.rng.integers(1, 6, n)
    return [{"text": t, "score": str(s)} for t, s in zip(texts, scores.tolist())]


def write_raw(out_dir: Path, n_questions: int, per_user: int, history_median: float, vocab: int, seed: int) -> dict:
    """LaMP raw files of the time-based kind: users of ``per_user`` questions; question j of a user sees the
    first H + j items of the user's history (H heavy-tailed, median ``history_median``) and asks for item H + j.
    Each item's JSON is serialized once and written into every profile that holds it (ids differ per question,
    as in LaMP), so the files are made at disk speed."""
    words = Words(vocab, seed)
    n_users = -(-n_questions // per_user)
    sizes = words.lengths(n_users, history_median, 4000)
    out_dir.mkdir(parents=True, exist_ok=True)
    qf = open(out_dir / "train_questions.json", "w", encoding="utf-8")
    golds, first, qid, items_written = [], True, 0, 0
    qf.write("[")
    for u, h in enumerate(sizes):
        items = review_items(words, h + per_user)
        bodies = [json.dumps(it, ensure_ascii=False)[1:] for it in items]    # '"text": ..., "score": ...}'
        for j in range(per_user):
            if qid >= n_questions:
                break
            profile = ",".join(f'{{"id": "{qid}{k:05d}", {bodies[k]}' for k in range(h + j))
            query = {"id": str(qid), "input": RATING_PROMPT + items[h + j]["text"]}
            head = json.dumps(query, ensure_ascii=False)[:-1]
            qf.write(("" if first else ",") + f'{head}, "profile": [{profile}]}}')
            golds.append({"id": str(qid), "output": items[h + j]["score"]})
            first, qid, items_written = False, qid + 1, items_written + h + j
        if (u + 1) % max(n_users // 5, 1) == 0:
            log(f"  raw data: {u + 1}/{n_users} users, {qid} questions, {items_written:,} profile items")
    qf.write("]")
    qf.close()
    with open(out_dir / "train_outputs.json", "w", encoding="utf-8") as f:
        json.dump({"task": "LaMP_3", "golds": golds}, f)
    return {"questions": qid, "users": n_users, "profile_items": items_written,
            "questions_mb": round((out_dir / "train_questions.json").stat().st_size / 2**20, 1)}


# ------------------------------------------------------------------------------------------- measurements
# Each runs in a child process (``--child NAME``) and prints one JSON line; the parent collects them.

def child_prepare(args) -> dict:
    from perpcs.data.prepare import prepare_lamp
    t0 = time.perf_counter()
    summary = prepare_lamp(TASK, args.raw, args.work, n_test=args.n, verbose=False)
    return {"seconds": time.perf_counter() - t0, "users": summary["users"]}


def child_user(args) -> dict:
    from perpcs.data.prompts import history_examples
    from perpcs.data.tasks import get_task
    words = Words(args.vocab, args.seed)
    items = [{"id": str(i), **it} for i, it in enumerate(review_items(words, args.n))]
    profile = "The user writes long reviews and rates gadgets harshly. " * 8
    base = rss_mb()
    t0 = time.perf_counter()
    examples = history_examples(get_task(TASK), items, profile)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "examples": len(examples), "items": len(items), "base_rss_mb": base,
            "distinct_words": len({w for it in items for w in it["text"].split()})}


def test_users(words: Words, n_users: int, history: int, queries: int, start: int = 0) -> list:
    users = []
    for u in range(n_users):
        items = review_items(words, history + queries)
        qid = f"{start + u}"
        users.append({"user_id": f"u{qid}", "profile": [{"id": f"{qid}-{i}", **it} for i, it in
                                                         enumerate(items[:history])],
                      "query": [{"id": f"{qid}-q{j}", "input": RATING_PROMPT + it["text"], "gold": it["score"]}
                                for j, it in enumerate(items[history:])]})
    return users


def child_variants(args) -> dict:
    from perpcs.data.tasks import get_task
    from perpcs.engine.generation import all_variant_examples, variant_names
    words = Words(args.vocab, args.seed)
    users = test_users(words, args.n, args.history, args.queries)
    profiles = {u["user_id"]: "The user writes long reviews and rates gadgets harshly. " * 8 for u in users}
    base = rss_mb()
    t0 = time.perf_counter()
    rows = all_variant_examples(get_task(TASK), users, variant_names([1, 2, 4]), profiles)
    return {"seconds": time.perf_counter() - t0, "rows": len(rows), "base_rss_mb": base}


def child_stage5(args) -> dict:
    """The test pipeline's stages 1-4 on the tiny Llama (tests/pipeline_fixture), then its test split replaced by
    ``args.n`` users of ``args.history`` movie descriptions each, and stage 5 run with RSS sampled per user."""
    import io
    from contextlib import redirect_stdout
    sys.path.insert(0, str(REPO / "tests"))
    import lora_composition
    import perpcs.stages.target_users as target_users   # stage 5's per-user loop runs there
    from perpcs.atomic import write_json_atomic
    from pipeline_fixture import build_pipeline
    from tiny import build_tiny_llama

    root = Path(args.work)
    model = build_tiny_llama(root / "tiny")
    log("  stage5: stages 1-4 of the test pipeline on the tiny Llama")
    with redirect_stdout(io.StringIO()):
        pipe = build_pipeline(root / "pipe", model)
    words = Words(args.vocab, args.seed)
    movie = ("Which tag does this movie relate to among the following tags? Just answer with the tag name without "
             "further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, dystopia, dark "
             "comedy, classic, psychology, fantasy, romance, thought-provoking, social commentary, violence, true "
             "story] description: ")
    users = []
    for u in test_users(words, args.n, args.history, args.queries, start=900000):
        users.append({"user_id": u["user_id"],
                      "profile": [{"id": it["id"], "description": it["text"], "tag": "comedy"} for it in u["profile"]],
                      "query": [{"id": q["id"], "input": movie + q["input"][len(RATING_PROMPT):], "gold": "comedy"}
                                for q in u["query"]]})
    layout = pipe.layout
    write_json_atomic(layout.test_users, users)
    write_json_atomic(layout.golds, {"task": layout.task.lamp_id, "golds": [{"id": q["id"], "output": q["gold"]}
                                                                           for u in users for q in u["query"]]})
    profiles = json.loads(layout.profiles.read_text())
    write_json_atomic(layout.profiles, {**profiles, **{u["user_id"]: f"profile of {u['user_id']}" for u in users}})

    samples = []
    real = target_users.run_user_groups   # stage 5's per-user loop (users prepared, then predicted in groups)

    def sampled_run_user_groups(users_, is_done, prepare, predict, *a, **kw):
        samples.append({"when": "before the first user", "rss_mb": rss_mb()})

        def sampled_predict(group):
            for item in predict(group):   # one item per user, after its predictions file is written
                done = sum(1 for x in samples if x["when"].startswith("after user"))
                samples.append({"when": f"after user {done + 1}", "rss_mb": rss_mb()})
                log(f"  stage5: user {done + 1}/{len(users_)}: RSS {samples[-1]['rss_mb']:.0f} MiB")
                yield item
        return real(users_, is_done, prepare, sampled_predict, *a, **kw)

    target_users.run_user_groups = sampled_run_user_groups
    argv = pipe.compose_args(root / "compose") + ["--max_gen_len", "2"]
    if args.recent_k:
        argv += ["--recent_k", str(args.recent_k)]
    samples.append({"when": "before stage 5", "rss_mb": rss_mb()})
    t0 = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        lora_composition.main(argv)
    after = [x["rss_mb"] for x in samples if x["when"].startswith("after user")]
    at = {x["when"]: x["rss_mb"] for x in samples}
    return {"seconds": time.perf_counter() - t0, "samples": samples, "rss_before_stage_mb":
            at["before stage 5"], "rss_before_first_user_mb": at["before the first user"],
            "rss_after_first_mb": after[0], "rss_after_last_mb": after[-1], "users": len(after)}


CHILDREN = {"prepare": child_prepare, "user": child_user, "variants": child_variants, "stage5": child_stage5}


def run_child(name: str, **kw) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    for key, value in kw.items():
        argv += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail = []
    for line in proc.stderr:   # progress lines live; the rest (tqdm, warnings) only if the child fails
        if line.startswith("[") and line[1:3].isdigit():
            print(line, end="", flush=True)
        tail = (tail + [line])[-40:]
    out = proc.stdout.read()
    proc.wait()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write("".join(tail))
        raise SystemExit(f"measurement {name} {kw} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def child_main(args) -> None:
    result = CHILDREN[args.child](args)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------- main

def sizes(args) -> dict:
    if args.quick:
        return {"questions": 400, "per_user": 8, "history_median": 20, "user_sizes": [50, 200],
                "variant_users": 5, "variant_history": 100, "stage5_users": 3, "stage5_history": 10,
                "stage5_recent_k": 0}
    return {"questions": args.questions, "per_user": args.per_user, "history_median": args.history_median,
            "user_sizes": args.user_sizes, "variant_users": args.variant_users, "variant_history": args.variant_history,
            "stage5_users": args.stage5_users, "stage5_history": args.stage5_history,
            "stage5_recent_k": args.stage5_recent_k}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every part (seconds)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--questions", type=int, default=20000)
    p.add_argument("--per_user", type=int, default=8, help="questions per user in the raw data")
    p.add_argument("--history_median", type=float, default=130, help="median history items of a raw-data user")
    p.add_argument("--user_sizes", type=lambda s: [int(x) for x in s.split(",")], default=[200, 500, 1000, 2000])
    p.add_argument("--variant_users", type=int, default=100)
    p.add_argument("--variant_history", type=int, default=500)
    p.add_argument("--stage5_users", type=int, default=20)
    p.add_argument("--stage5_history", type=int, default=1000)
    p.add_argument("--stage5_recent_k", type=int, default=100,
                   help="stage 5's --recent_k: the examples of the last k items (0: stage 5's default, 2000)")
    p.add_argument("--vocab", type=int, default=50000, help="distinct words the texts are drawn from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--work_dir", type=Path, help="where the generated data goes (default: a temporary dir)")
    # child mode (one measurement per process)
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for name in ("raw", "work"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("n", "history", "queries", "recent_k"):
        p.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    parts = [x for x in args.only.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown part(s) {unknown}; choose from {list(PARTS)}")
    size = sizes(args)
    report = {"sizes": size, "vocab": args.vocab, "omp_threads": os.environ.get("OMP_NUM_THREADS"),
              "load_before": os.getloadavg(), "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        common = {"vocab": args.vocab, "seed": args.seed}
        if "prepare" in parts:
            log(f"prepare: generating {size['questions']} questions")
            t0 = time.perf_counter()
            raw = write_raw(work / "raw", size["questions"], size["per_user"], size["history_median"], args.vocab,
                            args.seed)
            raw["generate_s"] = round(time.perf_counter() - t0, 1)
            log(f"prepare: raw data {raw}; running prepare_lamp")
            res = run_child("prepare", raw=work / "raw", work=work / "data", n=min(100, raw["users"] // 5), **common)
            report["parts"]["prepare"] = {**raw, **res}
            log(f"prepare: {res['seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MiB")
        if "user" in parts:
            report["parts"]["user"] = {}
            for n in size["user_sizes"]:
                res = run_child("user", n=n, **common)
                report["parts"]["user"][str(n)] = res
                log(f"user of {n} items: {res['examples']} examples in {res['seconds']:.2f} s, peak RSS "
                    f"{res['peak_rss_mb']:.0f} MiB (base {res['base_rss_mb']:.0f}), {res['distinct_words']} words")
        if "variants" in parts:
            res = run_child("variants", n=size["variant_users"], history=size["variant_history"], queries=4, **common)
            report["parts"]["variants"] = res
            log(f"variants: {res['rows']} rows ({size['variant_users']} users x 8 variants) in {res['seconds']:.1f} s, "
                f"peak RSS {res['peak_rss_mb']:.0f} MiB (base {res['base_rss_mb']:.0f})")
        if "stage5" in parts:
            res = run_child("stage5", n=size["stage5_users"], history=size["stage5_history"], queries=2,
                            recent_k=size["stage5_recent_k"],
                            work=work / "stage5", **common)
            report["parts"]["stage5"] = res
            log(f"stage5: RSS before stage 5 {res['rss_before_stage_mb']:.0f} MiB, before user 1 "
                f"{res['rss_before_first_user_mb']:.0f} MiB, after user 1 {res['rss_after_first_mb']:.0f} MiB, after user "
                f"{res['users']} "
                f"{res['rss_after_last_mb']:.0f} MiB, peak {res['peak_rss_mb']:.0f} MiB, {res['seconds']:.0f} s")
    report["load_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
