"""The ranges of numeric settings, one set of rules for the typed configs and the scripts' flags (cli_flags.py).

A rule checks a value and fails naming the flag (``--lr must be positive, got nan``): nan and inf pass no rule,
so a bad number stops the run before any model loads instead of turning every weight or prediction into nothing.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, field, fields

from perpcs.errors import fail


@dataclass(frozen=True)
class Range:
    """Finite numbers from ``low`` to ``high`` (either may be open or absent); ``integer``: whole numbers only."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    note: str = ""               # what a special value means, e.g. "0 = greedy"

    def describe(self) -> str:
        """'positive', 'at least 1', 'in (0, 1]', ... as the messages and --help say it."""
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low == 0 and self.low_open:
            text = "positive"
        elif self.low is not None:
            text = f"{'greater than' if self.low_open else 'at least'} {self.low}"
        else:
            text = "finite"
        text = ("an integer " + text) if self.integer and self.high is not None else text
        return text + (f" ({self.note})" if self.note else "")

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):   # numpy's numbers are Real too
            return False
        # a whole number is compared as it is (float() of a 400-digit int overflows)
        number = int(value) if isinstance(value, numbers.Integral) else float(value)
        if isinstance(number, float) and (not math.isfinite(number) or (self.integer and number != int(number))):
            return False
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return self.high is None or (number < self.high if self.high_open else number <= self.high)

    def check(self, flag: str, value):
        """``value`` if it is in range, else a PerpcsError naming ``flag``."""
        if not self.holds(value):
            fail(f"{flag} must be {self.describe()}, got {value}")
        return value

    def parse(self, flag: str, text: str):
        """A flag's text as an int (``integer``) or float, checked."""
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            fail(f"{flag} must be {'an integer' if self.integer else 'a number'}, {self.describe()}, got {text!r}")
        return self.check(flag, value)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, integer=True)                 # batch sizes, steps, epochs, ranks, k of top-k
NON_NEGATIVE_INT = Range(0, integer=True)
FRACTION = Range(0, 1, low_open=True)          # (0, 1]: top-p, share ratio
DROPOUT = Range(0, 1, high_open=True)          # [0, 1)
TEMPERATURE = Range(0, note="0 = greedy")
SEED = Range(0, 2**32 - 1, integer=True)       # what transformers.set_seed takes (numpy's range)


def check_all(*checks) -> None:
    """check_all((rule, flag, value), ...): every value that is not None, in order."""
    for rule, flag, value in checks:
        if value is not None:
            rule.check(flag, value)


# A setting is declared once, as a dataclass field carrying its default, its --help text and its rule (as peft's
# configs carry field(default=..., metadata={"help": ...})); the scripts' flags are built from these fields
# (cli_flags.add_config_flags) and the configs check their values with the same rules (check_settings). The
# metadata is plain data, so the library stays free of argparse. Keys besides help and rule:
#   flag: the flag's name(s) when not --<field> (a tuple: the first is shown, the others are aliases)
#   flag_rule: a stricter rule for the flag than for the library (--lr: the scripts refuse 0)
#   hidden_aliases, choices, distinct (a list whose items must differ), negatable (False: a plain switch)
#   shared: the value comes from a flag another group declares (--seed, --max_seq_len, --cpu_bf16)
#   cli: False for a setting no script exposes; help_of (on a nested config): help texts for this stage only
def setting(default=MISSING, *, default_factory=MISSING, help: str | None = None, rule: Range | None = None,
            **more):
    metadata = {key: value for key, value in dict(help=help, rule=rule, **more).items() if value is not None}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_names(f) -> tuple:
    """The flag(s) of a dataclass field: metadata["flag"], else --<name>."""
    flag = f.metadata.get("flag", "--" + f.name)
    return flag if isinstance(flag, tuple) else (flag,)


def check_settings(config) -> None:
    """Every field of ``config`` that has a rule, in field order (each item of a list); None is unset."""
    for f in fields(config):
        rule, value = f.metadata.get("rule"), getattr(config, f.name)
        if rule is not None and value is not None:
            for item in (value if isinstance(value, (tuple, list)) else (value,)):
                rule.check(flag_names(f)[0], item)
