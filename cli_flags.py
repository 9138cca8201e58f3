"""The stage scripts' flags, built from the library's typed configs (perpcs/stages/config.py), and the builders
that turn parsed flags back into those configs: the library never sees a Namespace.

Each setting is declared once, as a config field carrying its default, help and range (perpcs/checks.setting);
add_config_flags walks the fields and adds ``--<name>`` (or the field's ``flag``) with them, config_from_args reads
them back. The flag names and defaults are the published code's.

``type=bool`` flags of the original could not be turned off; here booleans are ``--flag/--no-flag``.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing

from perpcs.checks import NON_NEGATIVE_INT, Range, flag_names  # noqa: F401
from perpcs.data.prompts import check_max_seq_len
from perpcs.data.tasks import get_task
from perpcs.engine.training import TrainConfig
from perpcs.errors import fail
from perpcs.stages.config import GenerationConfig, LoraSettings, ModelConfig, ShardConfig, StageInputs
from perpcs.stages.manifest import set_command

# Flags of the published parsers that change nothing here: accepted (with a note) so that the authors' commands
# and scripts built on them run as written instead of stopping at an argparse error.
PUBLISHED_NO_OPS = {
    "--num_workers": "examples are tokenized in the training process",
    "--log_dir": "logs go to train_log.jsonl / users_log.jsonl in the output directory",
    "--w_lora": "sharer LoRAs are read from --anchor_dir / --anchor_path",
    "--w_gate": "gates are read from --gate_dir",
    "--model": "the architecture comes from --llama_model_path",
    "--warmup_epochs": "the published runs had no warm-up (docs/method.md section 5)",
    "--gate_reset": "gates always start from 0",
    "--test_idx_dir": "the target users are data/<task>/test_100/user_test_100.json",
}


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """The parser of a stage script: no abbreviated flags (``--k`` must not mean ``--k_list``), and the
    published parsers' no-op flags accepted (see :func:`parse`)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    for flag in PUBLISHED_NO_OPS:
        p.add_argument(flag, dest=_no_op_dest(flag), nargs="?", const="", default=None, help=argparse.SUPPRESS)
    return p


def _no_op_dest(flag: str) -> str:
    return "_no_op_" + flag.lstrip("-")


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then say in one line per given no-op flag that it changes nothing here, and drop it. The command is
    recorded for the run manifest (perpcs.stages.manifest): the calling script's path and these flags."""
    args = p.parse_args(argv)
    script = sys._getframe(1).f_code.co_filename   # the stage script whose parse_args called this
    set_command(script, sys.argv[1:] if argv is None else list(argv))
    for flag, why in PUBLISHED_NO_OPS.items():
        dest = _no_op_dest(flag)
        if getattr(args, dest, None) is not None:
            print(f"note: {flag} (a flag of the published code) is accepted and changes nothing here: {why}")
        if hasattr(args, dest):
            delattr(args, dest)
    check_flags(args)
    return args


def number(flag: str, rule: Range):
    """An argparse ``type``: the flag's text as a number in ``rule``'s range (perpcs/checks.py). A bad value
    raises the library's error, so the script prints ``error: --flag must be ..., got ...`` and exits 2 while
    parsing, before any model loads (argparse lets errors other than ValueError and TypeError through)."""
    def convert(text: str):
        return rule.parse(flag, text)
    convert.__name__ = "int" if rule.integer else "float"
    return convert


def add_number(p: argparse.ArgumentParser, flag: str, rule: Range, help: str | None = None, **kwargs):
    """A numeric flag checked by ``rule``; its range ends the --help text."""
    flags = flag if isinstance(flag, tuple) else (flag,)
    text = rule.describe()
    return p.add_argument(*flags, type=number(flags[0], rule), help=f"{help} ({text})" if help else text, **kwargs)


def check_flags(args) -> None:
    """The checks that need several flags, right after parsing: the shard in range, and --max_seq_len long enough
    for the task's instruction and the new tokens (perpcs/data/prompts.check_max_seq_len)."""
    num, sid = getattr(args, "num_shards", None), getattr(args, "shard_id", None)
    if num is not None and sid is not None and sid >= num:
        fail(f"--shard_id {sid} must be in [0, --num_shards {num})")
    if getattr(args, "max_seq_len", None) is not None and getattr(args, "task_name", None):
        check_max_seq_len(get_task(args.task_name), args.max_seq_len, getattr(args, "max_gen_len", None))


def check_profile_flags(args) -> None:
    """data/gen_profile.py: --max_seq_len holds the profile instruction and --max_gen_len new tokens."""
    task = get_task(args.task_name)
    check_max_seq_len(task, args.max_seq_len, args.max_gen_len, template=task.profile_prompts["profile_prompt"],
                      what="the profile instruction")


def add_alias(p: argparse.ArgumentParser, flag: str, dest: str, **kwargs) -> None:
    """Another spelling of a flag, accepted but not shown in --help (one spelling there)."""
    p.add_argument(flag, dest=dest, default=None, help=argparse.SUPPRESS, **kwargs)


def add_release_flags(p: argparse.ArgumentParser) -> None:
    """The OPPU release's spellings (its task_LoRA.py and OPPU.py): --k K predicts with BM25 top-K (0: none),
    --add_profile (both with- and without-profile predictions are always written here)."""
    p.add_argument("--k", type=number("--k", NON_NEGATIVE_INT), default=None, help=argparse.SUPPRESS)
    p.add_argument("--add_profile", action="store_true", help=argparse.SUPPRESS)


def apply_release_flags(args: argparse.Namespace) -> argparse.Namespace:
    """--k and --add_profile (add_release_flags) in this project's terms, each with a one-line note; dropped."""
    if args.k is not None:   # 0: no retrieval
        args.k_list = [args.k] if args.k > 0 else []
        print(f"note: --k {args.k} (the OPPU release's flag) means --k_list {' '.join(map(str, args.k_list))}"
              + (" (no retrieval)" if not args.k_list else ""))
    if args.add_profile:
        print("note: --add_profile (the OPPU release's flag): predictions with and without the profile are both "
              "written here (k*-profile.json and k*.json)")
    del args.k, args.add_profile
    return args


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (the published commands select GPUs with CUDA_VISIBLE_DEVICES)."""
    name = text.strip().lower()
    if name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def users_per_batch(text: str):
    """auto or a whole number >= 1."""
    name = text.strip().lower()
    if name == "auto":
        return name
    if name.isdigit() and int(name) >= 1:
        return int(name)
    raise argparse.ArgumentTypeError(f"expected auto or a whole number >= 1, got {text!r}")


# --device's and --users_per_batch's text checked while parsing (an argparse type: the library has no argparse)
FLAG_TYPES = {"--device": device_name, "--users_per_batch": users_per_batch}


def _nested(cls) -> dict:
    """{field name: config class} of the fields of ``cls`` that are configs themselves (StageInputs, TrainConfig)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _default(f, defaults):
    """A field's default: from the enclosing stage's own default (``defaults``, an instance), else the field's."""
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_config_flags(p: argparse.ArgumentParser, cls, defaults=None, help_of: dict | None = None) -> None:
    """A flag for each setting of the config class ``cls``, with its default, help and range; a field that is a
    config itself (a stage's inputs, train, generation, ...) adds its own flags, with the stage's defaults for it
    (SharerGateStage's lr 2e-5, not TrainConfig's 1e-4). ``defaults``: an instance whose values are the defaults;
    ``help_of``: help texts of this stage for some fields."""
    nested = _nested(cls)
    for f in dataclasses.fields(cls):
        default = _default(f, defaults)
        if f.name in nested:
            add_config_flags(p, nested[f.name], None if default is dataclasses.MISSING else default,
                             f.metadata.get("help_of"))
        elif not f.metadata.get("shared") and f.metadata.get("cli", True):
            _add_flag(p, f, default, (help_of or {}).get(f.name, f.metadata.get("help")))


def _add_flag(p: argparse.ArgumentParser, f, default, help: str | None) -> None:
    meta, flags = f.metadata, flag_names(f)
    kwargs = {"dest": flags[0].lstrip("-")}
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = list(default) if isinstance(default, tuple) else default
    if "choices" in meta:
        kwargs["choices"] = list(meta["choices"])
    if isinstance(default, tuple):
        kwargs["nargs"] = "+"
    if meta.get("distinct"):
        kwargs["action"] = _DistinctPositive
    rule = meta.get("flag_rule", meta.get("rule"))
    if rule is not None:
        add_number(p, flags, rule, help, **kwargs)
    else:
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction if meta.get("negatable", True) else "store_true"
        elif flags[0] in FLAG_TYPES:
            kwargs["type"] = FLAG_TYPES[flags[0]]
        p.add_argument(*flags, help=help.replace("%", "%%") if help else help, **kwargs)
    for alias in meta.get("hidden_aliases", ()):
        add_alias(p, alias, dest=kwargs["dest"])


def config_from_args(cls, args, defaults=None, **given):
    """The config ``cls`` from parsed flags: each setting from its flag (a shared one from the flag another group
    declares), a setting without a flag in this script at the stage's default; ``given`` overrides."""
    nested, values = _nested(cls), {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            continue
        if f.name in nested:
            default = _default(f, defaults)
            values[f.name] = config_from_args(nested[f.name], args,
                                              None if default is dataclasses.MISSING else default)
            continue
        dest = flag_names(f)[0].lstrip("-")
        if f.metadata.get("cli") is not False and hasattr(args, dest):
            value = getattr(args, dest)
            values[f.name] = tuple(value) if isinstance(value, list) else value
        elif defaults is not None:
            values[f.name] = getattr(defaults, f.name)
    return cls(**values, **given)


class _DistinctPositive(argparse.Action):
    """--k_list: each k names a predictions file (k2.json), so a repeated k is an error (its type refuses k < 1)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(set(values)) != len(values):
            fail(f"{option_string} must be distinct, got {' '.join(map(str, values))}")
        setattr(namespace, self.dest, values)


def model_config(args) -> ModelConfig:
    return config_from_args(ModelConfig, args)


def stage_inputs(args) -> StageInputs:
    return config_from_args(StageInputs, args)


def lora_settings(args) -> LoraSettings:
    return config_from_args(LoraSettings, args)


def train_config(args) -> TrainConfig:
    """Checks the training flags (TrainConfig refuses bad ones) before any model loads."""
    return config_from_args(TrainConfig, args)


def generation_config(args) -> GenerationConfig:
    return config_from_args(GenerationConfig, args)


def shard_config(args) -> ShardConfig:
    return config_from_args(ShardConfig, args)
