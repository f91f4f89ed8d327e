"""Per-module precision recipes (``--recipe FILE|experts-only|attention-int8``).

A recipe is an ordered list of rules; the first rule whose ``match`` names a module gives its
setting, and a module no rule names keeps the run's own (``--bits``, ``--group-size``, ``--sym``).
In TOML::

    [[rules]]
    match = "re:.*self_attn\\\\..*"   # a module's source name: exact, or re: (re.match, anchored at the start)
    bits = 8                         # and/or group_size, sym; or skip = true (kept in 16 bits)

``match`` may also be ``class:<kind>`` (attention, expert, shared_expert, dense_mlp: the kinds of the
architecture table), which the built-in presets use so that they fit every family. Which recipes vLLM
can serve (one scheme for the experts of a MoE layer, for q/k/v, for gate and up) is checked against
the model in ``stages.quantize``; this file only reads and matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from .errors import QuantMoeError

KINDS = ("attention", "expert", "shared_expert", "dense_mlp")
SETTINGS = ("bits", "group_size", "sym", "skip")


@dataclass(frozen=True)
class Rule:
    """One rule: which modules (``match``) and what they get (None: the run's own value)."""

    match: str                     # exact source name, "re:<regex>" or "class:<kind>"
    bits: int | None = None        # 4 or 8
    group_size: int | None = None  # -1 or positive
    sym: bool | None = None
    skip: bool = False             # True: left in 16 bits, copied from the source

    def matches(self, name: str, kind: str) -> bool:
        if self.match.startswith("re:"):
            return re.match(self.match[3:], name) is not None
        if self.match.startswith("class:"):
            return self.match[6:] == kind
        return self.match == name


PRESETS: dict[str, tuple[Rule, ...]] = {
    # Routed experts only: attention, shared experts and dense MLPs stay in 16 bits.
    "experts-only": (Rule("class:attention", skip=True), Rule("class:shared_expert", skip=True),
                     Rule("class:dense_mlp", skip=True)),
    "attention-int8": (Rule("class:attention", bits=8),),
}


def load_recipe(recipe: str) -> tuple[Rule, ...]:
    """The rules of a preset name or a TOML file ("" or "none": no rules)."""
    if recipe in ("", "none"):
        return ()
    if recipe in PRESETS:
        return PRESETS[recipe]
    path = Path(recipe).expanduser()
    if not path.is_file():
        raise QuantMoeError(f"--recipe {recipe!r} is neither a preset ({', '.join(PRESETS)}) nor a TOML file; "
                            "check the path")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise QuantMoeError(f"--recipe {path} is not valid TOML ({exc}); fix the file") from None
    return parse_rules(data, str(path))


def parse_rules(data: dict, source: str) -> tuple[Rule, ...]:
    """Rules from a parsed recipe: a ``rules`` array of tables, each a ``match`` and at least one setting."""
    extra = sorted(set(data) - {"rules"})
    rules = data.get("rules")
    if extra or not isinstance(rules, list) or not rules:
        raise QuantMoeError(f"recipe {source} must hold one or more [[rules]] tables and nothing else"
                            + (f" (found {', '.join(extra)})" if extra else ""))
    return tuple(_rule(r, f"recipe {source}, rule {k + 1}") for k, r in enumerate(rules))


def _rule(table, where: str) -> Rule:
    if not isinstance(table, dict):
        raise QuantMoeError(f"{where} is not a table; write it as [[rules]] with match = ... and a setting")
    unknown = sorted(set(table) - {"match", *SETTINGS})
    if unknown:
        raise QuantMoeError(f"{where} has unknown key {unknown[0]!r}; a rule has match and {', '.join(SETTINGS)}")
    match = table.get("match")
    if not isinstance(match, str) or not match:
        raise QuantMoeError(f"{where} needs match = \"<module name>\" or \"re:<regex>\"")
    if match.startswith("re:"):
        try:
            re.compile(match[3:])
        except re.error as exc:
            raise QuantMoeError(f"{where}: match {match!r} is not a valid regular expression ({exc})") from None
    if match.startswith("class:") and match[6:] not in KINDS:
        raise QuantMoeError(f"{where}: match {match!r} names no module class; use class: with one of {', '.join(KINDS)}")
    if not set(table) & set(SETTINGS):
        raise QuantMoeError(f"{where} sets nothing; give bits, group_size, sym or skip = true")
    bits, group_size, sym, skip = (table.get(k) for k in SETTINGS)
    if skip is not None and (skip is not True or len(table) > 2):
        raise QuantMoeError(f"{where}: skip = true keeps a module in 16 bits and takes no other setting; "
                            "drop skip or the other settings")
    if bits is not None and (isinstance(bits, bool) or bits not in (4, 8)):
        raise QuantMoeError(f"{where}: bits = {bits!r}; use 4 or 8")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or not (group_size == -1 or group_size > 0)):
        raise QuantMoeError(f"{where}: group_size = {group_size!r}; use -1 or a positive size such as 128")
    if sym is not None and not isinstance(sym, bool):
        raise QuantMoeError(f"{where}: sym = {sym!r}; use true or false")
    return Rule(match, bits, group_size, sym, bool(skip))


def first_rule(rules: tuple[Rule, ...], name: str, kind: str) -> Rule | None:
    """The first of ``rules`` that matches the module ``name`` (source name) of class ``kind``."""
    return next((r for r in rules if r.matches(name, kind)), None)
