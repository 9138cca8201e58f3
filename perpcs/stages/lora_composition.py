"""Stage 5 driver: recipes, optional adapters, predictions and a summary for every target user.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from perpcs.atomic import write_bytes_atomic, write_dir_atomic, write_json_atomic
from perpcs.data.layout import read_json
from perpcs.data.truncation import count_cuts, log_totals, report_stage, user_entry
from perpcs.engine.training import tokenize_example, user_seed
from perpcs.errors import fail
from perpcs.method.calibration import Calibration
from perpcs.method.composition import (Composer, ComposeSettings, assemble_user, composer_removed, install_composer,
                                       micro_batch_overhead)
from perpcs.method.controls import (MERGED_ADAPTER, ONE_SHARER, derangement, nearest_sharer, one_sharer_weights,
                                    peft_merged_model, random_sharer, uniform_weights)
from perpcs.method.gates import GATES_FILE
from perpcs.method.pieces import PiecePool, composed_lora_model, load_composed
from perpcs.method.recipes import (gate_scores_record, make_recipe, pooled_vectors_bytes, recipe_weights,
                                   write_recipe)
from perpcs.method.storage import adapter_bytes, format_bytes, recipe_payload
from perpcs.models.provenance import SOURCE_FILE, adapter_sha256, file_sha256, read_source, refuse_other_sources
from perpcs.paths import (GATE_SCORES_DIR, control_dir_name, resolve_sharer_index, resolve_sharer_lora_dir,
                          user_file_name)
from perpcs.stages.common import (last_per_user, lazy, load_merged_base, load_sharers, made_from, merged_base_sources,
                                  refuse_other_settings, users_data)
from perpcs.stages.config import CompositionStage, StageInputs
from perpcs.stages.manifest import canonical_sha256
from perpcs.stages.sharer_gates import reference_summaries
from perpcs.stages.target_users import TargetRun, target_run, users_per_batch

USER_ADAPTER = "default"   # composed_lora_model's adapter (peft's default name)
RETRIEVAL_MAX_LENGTH = 512   # --control nearest_sharer: tokens per history item, stage 2's default --max_length


def recipe_path(root, uid: str) -> Path:
    return Path(root) / "recipes" / user_file_name(uid, ".json")


def gate_scores_path(root, uid: str) -> Path:
    return Path(root) / GATE_SCORES_DIR / user_file_name(uid, ".json")


def pooled_path(root, uid: str) -> Path:
    """--save_scores: the user's pooled vectors (the gate summary per piece), beside its scores."""
    return Path(root) / GATE_SCORES_DIR / user_file_name(uid, ".safetensors")


def check_existing_recipes(out_root: Path, uids: list, settings: ComposeSettings, sharer_ids: list,
                           inputs: Callable, overwrite: bool, control: str | None = None) -> None:
    """A rerun resumes finished users only if they were assembled with the same settings, sharers and inputs
    (``inputs(uid)``: base model, task LoRA, sharer LoRAs, gates, --max_seq_len, the user's history): otherwise a
    sweep (say --topk 1 after --topk 3) into the same
    output dir would report the old recipes as the new run's."""
    if overwrite:
        return
    wanted = settings.recorded()
    for uid in uids:
        path = recipe_path(out_root, uid)
        if path.is_file():
            recipe = read_json(path, "recipe")
            if recipe.get("control") != control:   # Per-Pcs recipes have none
                fail(f"{path} was made " + (f"by --control {recipe['control']}" if recipe.get("control") else
                                            "by Per-Pcs (no --control)") + ", not by this run's "
                     + (f"--control {control}" if control else "Per-Pcs") + "; pass another --output_dir, or "
                     "--overwrite to redo every user")
            if [str(s) for s in recipe.get("sharers", [])] != list(sharer_ids):
                fail(f"{path} was assembled from another sharer selection ({len(recipe.get('sharers', []))} "
                     f"sharers, not the {len(sharer_ids)} of this run's anchor index); pass another --output_dir, "
                     f"or --overwrite to redo every user")
            refuse_other_settings(path, recipe.get("settings", {}), wanted, "assembled")
            refuse_other_sources(path, recipe.get("inputs"), inputs(uid), "assembled")


def composition_inputs(inputs: StageInputs, pool: PiecePool, gate_dir: Path) -> dict:
    """What every recipe is made from besides its settings and its user's history: the base model, the task LoRA,
    and each sharer's LoRA and gates (in pool order). Gates trained on another sharer LoRA than the one in
    --anchor_dir are refused here: mixing them would describe neither."""
    sources = merged_base_sources(inputs)
    adapters, gates, objectives = {}, {}, {}
    for uid in pool.sharer_ids:
        adapters[uid] = adapter_sha256(pool.anchor_dir / user_file_name(uid))
        gate_path = gate_dir / user_file_name(uid)
        gates[uid] = file_sha256(gate_path / GATES_FILE)
        recorded = read_source(gate_path / SOURCE_FILE)
        objectives[uid] = (recorded or {}).get("gate_objective")   # --gate_objective routing records it
        refuse_other_sources(f"{gate_path / SOURCE_FILE} (the gates of sharer {uid})", recorded, sources, "trained",
                             remedy=f"pass the --llama_model_path / --lora_ckpt they were trained on, or train them "
                                    f"again: train_anchor_gate.py --overwrite --output_dir {gate_dir}")
        if recorded.get("adapter_sha256") != adapters[uid]:
            fail(f"{gate_path / SOURCE_FILE}: the gates of sharer {uid} were trained on another LoRA than "
                 f"{pool.anchor_dir / user_file_name(uid)} (adapter {str(recorded.get('adapter_sha256'))[:12]}... "
                 f"there, {adapters[uid][:12]}... now): the sharer LoRAs changed after the gates; run "
                 f"train_anchor_gate.py --overwrite on them, or pass the --anchor_dir the gates were trained on")
    extra = {"gate_objective": objectives} if any(objectives.values()) else {}   # none recorded: published gates
    return {**sources, "sharers": list(pool.sharer_ids), "sharer_adapters": adapters, "gates": gates, **extra}


def recipe_inputs(shared: dict, max_seq_len: int, user_data: str) -> dict:
    """A recipe's record of what it mixed: the sharer LoRAs and gates, the user's history, the example length."""
    return {**{k: v for k, v in shared.items() if k != "sharers"}, "max_seq_len": max_seq_len,
            "history_sha256": user_data}


def retrieval_encoder(cfg: CompositionStage, index_path) -> dict | None:
    """--control nearest_sharer: the encoder that embeds histories, {"name", "dir", "sha256"}: --encoder, else the
    one stage 2 recorded in its index (a cluster selection), else stage 2's default (the bundled MiniLM). None for
    the other runs, which embed nothing (--encoder is refused there)."""
    from perpcs.models.encoder import encoder_digest, resolve_encoder
    from perpcs.stages.sharer_selection import load_sharer_index
    if cfg.control != "nearest_sharer":
        if cfg.encoder is not None:
            fail("--encoder is read by --control nearest_sharer only (the history embeddings that choose the "
                 f"nearest sharer); this run is {'--control ' + cfg.control if cfg.control else 'Per-Pcs'}")
        return None
    encoder = cfg.encoder
    if encoder is None:
        encoder = load_sharer_index(index_path).get("encoder")   # None: stage 2 embedded nothing (not cluster)
        if encoder is not None and Path(str(encoder)).is_absolute() and not Path(str(encoder)).is_dir():
            fail(f"{index_path} records the encoder {encoder}, which is not a directory here; pass --encoder (the "
                 f"same encoder, to choose as stage 2 embedded)")
    name, directory = resolve_encoder(encoder)
    return {"name": name, "dir": directory, "sha256": encoder_digest(directory)}


def one_sharer_chooser(control: str, task, sharers: list, seed: int, encoder: dict | None, device: str) -> Callable:
    """--control nearest_sharer / random_sharer: ``choose(uid, user)`` -> (sharer index, what the recipe records
    of the choice, seconds it took or None). nearest_sharer embeds the sharers' histories once (at the first
    user), then each user's own history, with stage 2's code (embed_users: the task's history item text, mean
    pooled per item, averaged over the user's items)."""
    if control == "random_sharer":
        def draw(uid, user):
            index = random_sharer(uid, len(sharers), seed)
            return index, {"sharer": sharers[index][0], "sharer_index": index, "seed_user": user_seed(seed, uid)}, None
        return draw

    @lazy
    def embedder():   # the encoder and the sharers' vectors, once per process
        from perpcs.models.devices import resolve_device
        from perpcs.models.encoder import embed_users, load_encoder
        dev = resolve_device(device)
        print(f"nearest sharer: embedding the histories of {len(sharers)} sharers with {encoder['name']} on {dev}")
        tokenizer, model = load_encoder(encoder["dir"], dev)
        vectors = embed_users([u for _, u in sharers], task, tokenizer, model, max_length=RETRIEVAL_MAX_LENGTH)
        return tokenizer, model, vectors

    def nearest(uid, user):
        from perpcs.models.encoder import embed_users
        tokenizer, model, vectors = embedder()
        t0 = time.perf_counter()
        target = embed_users([user], task, tokenizer, model, max_length=RETRIEVAL_MAX_LENGTH)[0]
        index, cosines = nearest_sharer(target, vectors)
        seconds = time.perf_counter() - t0
        return index, {"sharer": sharers[index][0], "sharer_index": index, "encoder": encoder["name"],
                       "cosines": {sid: c for (sid, _), c in zip(sharers, cosines)}}, seconds
    return nearest


def compose(cfg: CompositionStage) -> Path:
    control = cfg.control
    run = target_run(cfg.inputs, cfg.test_split, cfg.output_dir,
                     lambda dirs: dirs["composition"].with_name(control_dir_name(control)) if control
                     else dirs["composition"])
    task, dirs, out_root = run.task, run.dirs, run.out_root
    settings = cfg.compose
    index_path = resolve_sharer_index(cfg.anchor_idx_path, task.name)
    sharers = load_sharers(index_path, run.layout.candidate_users, task)
    encoder = retrieval_encoder(cfg, index_path)
    settings.check(len(sharers))
    print(f"selection {settings.describe()}")
    gate_dir = Path(cfg.gate_dir or dirs["sharer_gates"])
    pool = PiecePool([uid for uid, _ in sharers], resolve_sharer_lora_dir(cfg.anchor_dir or dirs["sharer_loras"]),
                     gate_dir)
    run.check_histories()
    cfg.shards.resolve()   # a bad --shard_id is refused here, before the inputs are digested
    shared = composition_inputs(cfg.inputs, pool, gate_dir)
    calibration = None
    if settings.score_calibration != "none":   # the reference's digests: inputs of every recipe and of the manifest
        means, shared["reference_summaries"] = reference_summaries(gate_dir, pool.sharer_ids)
        calibration = Calibration(settings.score_calibration, means, pool.G)
    recorded = {"compose": settings.recorded(), "control": control, "max_seq_len": cfg.max_seq_len,
                "generation": cfg.generation.recorded(task)}
    if encoder is not None:   # nearest_sharer: the encoder's files are an input of every choice, its length a setting
        shared["encoder_sha256"] = encoder["sha256"]
        recorded["encoder_max_length"] = RETRIEVAL_MAX_LENGTH
    manifest = run.manifest("composition", recorded, shared, cfg.inputs.model)
    # predictions: made from the user's recipe, so from everything the run mixes
    shared_sha256 = canonical_sha256(shared)
    predicted_from = lambda uid: made_from(manifest, uid, inputs_sha256=shared_sha256)  # noqa: E731
    if control in ONE_SHARER:
        print(f"control: {control} (PEFT retrieval: one sharer's whole LoRA per user) -> {out_root}")
    elif control is not None:
        print(f"control: {control} (user-blind; the same sharers and gates as Per-Pcs) -> {out_root}")
    choose = (one_sharer_chooser(control, task, sharers, settings.seed, encoder, cfg.inputs.model.device)
              if control in ONE_SHARER else None)
    history_of = derangement(run.uids, settings.seed) if control == "swapped" else {}
    # a recipe is made from the history alone (and the profile text, where used)
    histories = users_data(task, run.users, run.history_profiles, queries=False)

    def recipe_made_from(uid):   # what this user's recipe is made from (swapped: the partner's history)
        return recipe_inputs(shared, cfg.max_seq_len, histories[history_of.get(uid, uid)])

    def check_outputs():   # recipes and predictions made otherwise are refused, whoever's shard they are
        if control == "peft_merge":
            source_path = out_root / "merge_inputs.json"
            if source_path.is_file():
                refuse_other_sources(source_path, read_json(source_path, "merge inputs"), shared, "merged")
        else:
            check_existing_recipes(out_root, run.uids, settings, pool.sharer_ids, recipe_made_from, False, control)
        run.check_predictions(cfg.generation, predicted_from)

    with run.open(manifest, cfg.shards, check_outputs):
        if control == "peft_merge":
            return merge_control(cfg, run, pool, shared, predicted_from)
        return compose_users(cfg, run, pool, recipe_made_from, predicted_from, history_of, choose, calibration)


def compose_users(cfg: CompositionStage, run: TargetRun, pool: PiecePool, inputs: Callable, predicted_from: Callable,
                  history_of: dict, choose: Callable | None = None, calibration=None) -> Path:
    """Per-Pcs (and the swapped / uniform / one-sharer controls): each user's recipe, then its predictions,
    resumably. ``inputs(uid)`` / ``predicted_from(uid)``: what the user's recipe / predictions record they were
    made from; ``history_of``: swapped's partners; ``choose``: the one-sharer controls' choice
    (one_sharer_chooser)."""
    settings, overwrite, control = cfg.compose, cfg.shards.overwrite, cfg.control
    task, out_root = run.task, run.out_root
    save_scores = cfg.save_scores and control in (None, "swapped")   # the other controls run no gates: no scores

    def scores_missing(uid):   # a finished user is assembled again (deterministically) for its scores
        return save_scores and not (gate_scores_path(out_root, uid).is_file() and pooled_path(out_root, uid).is_file())

    @lazy
    def engine():   # loaded at the first user to do: a rerun with every user done loads no model
        model, tokenizer, device = load_merged_base(cfg.inputs)
        pool.to(device)   # read and checked before the model load; it lives beside the model
        peft_model = composed_lora_model(model, pool)   # one adapter: each user's LoRA is loaded into it
        composer = Composer(pool, settings)
        composer.calibration = calibration.to(device) if calibration is not None else None
        install_composer(model, composer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return model, peft_model, tokenizer, device, composer, pad_id

    def prepare(uid, user):   # the user's recipe (written, or read back), its adapter if asked: (weights, stats)
        model, peft_model, tokenizer, device, composer, pad_id = engine()
        source = history_of.get(uid, uid)   # swapped: the partner's history and seed, so its Per-Pcs recipe
        seed = user_seed(settings.seed, source)
        path = recipe_path(out_root, uid)
        t0 = time.perf_counter()
        timing = {}   # kept in users_log.jsonl, not in the recipe, so recipes are byte-reproducible
        assembly_cuts = None
        if path.is_file() and not overwrite and not scores_missing(uid):   # killed before the predictions
            recipe = read_json(path, "recipe")
            weights = recipe_weights(recipe, pool, path)
        elif control == "uniform":   # no assembly: no forward, no history
            weights = uniform_weights(pool)
            recipe = make_recipe(pool, weights, settings, uid, task.name, [],
                                 {"control": control, "inputs": inputs(uid)})
            write_recipe(recipe, path)
        elif control in ONE_SHARER:   # one sharer's whole LoRA: no gates, no forward
            sharer, choice, seconds = choose(uid, user)
            weights = one_sharer_weights(pool, sharer)
            recipe = make_recipe(pool, weights, settings, uid, task.name, [],
                                 {"control": control, **choice, "inputs": inputs(uid)})
            write_recipe(recipe, path)
            if seconds is not None:   # nearest_sharer: embedding the user's history and the choice
                timing["assembly_seconds"] = round(seconds, 4)
        else:
            # in its turn: one user's examples alive at a time (swapped: the partner's history)
            examples = run.examples(source, settings.recent_k)
            tokenized = [tokenize_example(tokenizer, ex, cfg.max_seq_len) for ex in examples]
            del examples
            assembly_cuts = count_cuts([t.cut for t in tokenized], cfg.max_seq_len)
            with peft_model.disable_adapter():   # assembly sees base + task model and the composer's pieces only
                weights, batches = assemble_user(model, composer, tokenized, pad_id, device, seed, f"user {uid!r}",
                                                 cpu_bf16=cfg.inputs.model.cpu_bf16,
                                                 micro_batch_overhead=micro_batch_overhead(cfg.split_batches, device))
            seconds = time.perf_counter() - t0
            extra = {"control": control, "history_of": source} if control else {}
            if save_scores:
                write_json_atomic(gate_scores_path(out_root, uid), gate_scores_record(
                    pool, composer.final_scores(), uid, task.name, {"batches": len(batches), **extra}))
                write_bytes_atomic(pooled_path(out_root, uid), pooled_vectors_bytes(
                    composer.final_pooled(), uid, task.name, {"batches": len(batches), **extra}))
            else:   # scores of an earlier assembly would no longer match this recipe
                gate_scores_path(out_root, uid).unlink(missing_ok=True)
                pooled_path(out_root, uid).unlink(missing_ok=True)
            recipe = make_recipe(pool, weights, settings, uid, task.name, batches,
                                 {"seed_user": seed, "examples": len(tokenized), "inputs": inputs(uid), **extra})
            write_recipe(recipe, path)
            timing["assembly_seconds"] = round(seconds, 4)
        if cfg.save_adapters:
            pool.save_adapter(weights, out_root / "adapters" / user_file_name(uid))
        return weights, (timing, assembly_cuts)

    def predict(group):   # [(uid, user, prepare's)]: each user's LoRA in its own adapter, their rows batched
        model, peft_model, tokenizer, device, _, _ = engine()
        with composer_removed(model):   # predicted as OPPU is: peft's LoRA layers on base + task model
            names = user_adapters(peft_model, len(group))
            for name, (_, _, (weights, _)) in zip(names, group):
                load_composed(peft_model, pool, weights, adapter_name=name)
            for uid, shortened in run.predict_group(peft_model, tokenizer, device, [uid for uid, _, _ in group],
                                                    cfg.generation, predicted_from,
                                                    names if len(group) > 1 else None):
                timing, assembly_cuts = next(state[1] for u, _, state in group if u == uid)
                yield uid, {**timing, "truncated": user_entry(uid, assembly_cuts, shortened)}

    run.run_groups(lambda uid: recipe_path(out_root, uid).is_file() and run.predictions_path(uid).is_file()
                   and not scores_missing(uid), prepare, predict, "composition", cfg.shards,
                   users_per_batch(cfg.users_per_batch, cfg.inputs.model.device, cfg.generation.temperature,
                                   cfg.inputs.model.cpu_bf16))
    report_stage("composition", log_totals(run.log_path, run.uids))
    if run.combine():
        write_summary(out_root, pool, run.uids)
    return out_root


def merge_control(cfg: CompositionStage, run: TargetRun, pool: PiecePool, shared: dict,
                  predicted_from: Callable) -> Path:
    """--control peft_merge: one adapter, peft's add_weighted_adapter of the sharer adapters (perpcs.method.controls),
    written once to <output>/adapter/, then every test user's predictions with it (no recipes: no user enters it)."""
    out_root = run.out_root
    source_path = out_root / "merge_inputs.json"   # what the adapter and predictions were made from (checked)
    wanted = shared

    @lazy
    def engine():
        model, tokenizer, device = load_merged_base(cfg.inputs)
        peft_model = peft_merged_model(model, pool)
        peft_model.to(device)
        write_dir_atomic(out_root / "adapter", lambda staging: peft_model.save_pretrained(
            str(staging), selected_adapters=[MERGED_ADAPTER]))
        write_json_atomic(source_path, wanted)
        return peft_model, tokenizer, device

    def predict(group):   # one adapter for every user: their rows batched on it
        peft_model, tokenizer, device = engine()
        for uid, shortened in run.predict_group(peft_model, tokenizer, device, [uid for uid, _, _ in group],
                                                cfg.generation, predicted_from):
            yield uid, {"truncated": user_entry(uid, None, shortened)}

    run.run_groups(lambda uid: run.predictions_path(uid).is_file(), lambda uid, user: None, predict, "composition",
                   cfg.shards, users_per_batch(cfg.users_per_batch, cfg.inputs.model.device,
                                               cfg.generation.temperature, cfg.inputs.model.cpu_bf16))
    if run.combine():
        size = adapter_bytes(out_root / "adapter")
        write_json_atomic(out_root / "summary.json", {"control": "peft_merge", "n_users": len(run.uids),
                                                      "n_sharers": len(pool), "adapter_bytes": size})
        print(f"summary: one merged adapter for all users ({format_bytes(size)}) -> {out_root / 'summary.json'}")
    return out_root


def user_adapters(peft_model, n: int) -> list:
    """The names of n adapters of composed_lora_model's config on ``peft_model``, one per user of a prediction
    batch: its own adapter first, the others added once (the composer's wrappers removed) and reused."""
    names = [USER_ADAPTER] + [f"user_slot_{i}" for i in range(1, n)]
    for name in names[1:]:
        if name not in peft_model.peft_config:
            peft_model.add_adapter(name, peft_model.peft_config[USER_ADAPTER])
    return names


def write_summary(out_root: Path, pool: PiecePool, uids: list) -> dict:
    """Per user and on average: assembly seconds; storage as perpcs.storage defines it: payload_bytes (the
    recipe's sharer ids and weights per piece, what re-materialises the LoRA) beside recipe_bytes (the whole
    recipe file, with its bookkeeping: settings, batches, seed); sharers chosen per piece. Once: the sharer
    LoRAs as stored (a fixed cost of all users together)."""
    seconds = assembly_seconds(out_root / "users_log.jsonl")
    per_user = {}
    for uid in uids:
        path = recipe_path(out_root, uid)
        recipe = read_json(path, "recipe")
        counts = [len(v) for v in recipe["pieces"].values()]
        per_user[uid] = {"assembly_seconds": seconds.get(uid), "payload_bytes": len(recipe_payload(recipe, path)),
                         "recipe_bytes": path.stat().st_size, "sharers_per_piece": sum(counts) / max(len(counts), 1)}
    mean = {key: _mean([u[key] for u in per_user.values()])
            for key in ("assembly_seconds", "payload_bytes", "recipe_bytes", "sharers_per_piece")}
    sharer_bytes = [adapter_bytes(pool.anchor_dir / user_file_name(uid)) for uid in pool.sharer_ids]
    pool_bytes = sum(sharer_bytes) if None not in sharer_bytes else None
    summary = {"users": per_user, "mean": mean, "n_users": len(per_user), "n_sharers": len(pool),
               "n_pieces": len(pool.pieces), "truncated": log_totals(out_root / "users_log.jsonl", uids),
               "sharer_pool_bytes": pool_bytes,
               "sharer_adapter_bytes": pool_bytes / len(pool) if pool_bytes is not None else None}
    write_json_atomic(out_root / "summary.json", summary)
    secs = "-" if mean["assembly_seconds"] is None else f"{mean['assembly_seconds']:.2f}"
    print(f"summary: {secs} s per user; storage per user {format_bytes(mean['payload_bytes'])} (sharer ids and "
          f"weights; recipe file with bookkeeping {format_bytes(mean['recipe_bytes'])}); sharer LoRAs "
          f"{format_bytes(pool_bytes)} in all -> {out_root / 'summary.json'}")
    return summary


def _mean(values) -> float | None:
    """Mean over the users that have the value (a user resumed from its recipe has no timing); None if none has."""
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def assembly_seconds(log_path: Path) -> dict:
    """{user: seconds of its last assembly} (a user resumed from its recipe logs none)."""
    return last_per_user(log_path, "assembly_seconds")
