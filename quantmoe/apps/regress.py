"""Perplexity regression check: a new eval report against a baseline report of the same model,
protocol and eval data (the ``eval_report.json`` that quantize and ``quantmoe eval --report`` write).

What is compared:
- relative gap = (ppl quantized - ppl original) / ppl original, shown in percent. The gap
  increase is new minus baseline relative gap in percentage points (pp): ``max_gap_increase``
  0.5 fails a new gap more than 0.5 pp above the baseline's (baseline +3.50%, new +4.10%:
  +0.60 pp, a regression). It needs both reports to hold an original-model run (``--baseline``).
- perplexity increase = (new quantized ppl - baseline quantized ppl) / baseline quantized ppl, in
  percent; ``max_ppl_increase`` fails it above that many percent (off unless given).
- shown, not judged: each gap's standard error over windows, and, where both reports have them
  (reports since the KL was added), the KL to the original and the share of positions with the
  original's most likely token: steadier than the gap, but no threshold applies to them.

Reports are comparable only when they describe the same thing; otherwise the comparison is
refused, naming the field:
- every ``protocol`` field (seqlen, join, special tokens, windows, metric, dtype, ...) except
  ``protocol.data``, the text's path, which differs between machines (the text itself is checked
  through ``data.text_sha256``);
- every ``data`` field except ``path``: ``text_sha256``, ``tokenizer_fingerprint``, documents,
  tokens, windows, tokens scored;
- the model: both reports have an original-model run or neither; when both do, the base model's
  name (folder name or Hub id) and the original perplexity (within ORIGINAL_PPL_TOLERANCE, to allow
  for float differences between CPUs) must agree.

Reports are untrusted files: a missing or non-numeric number is refused (exit 2, naming the field),
a NaN or infinite one in the baseline too, and one in the new report is a regression (exit 1): a
comparison with NaN is always false, so it would otherwise pass as "no regression".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..base.errors import QuantMoeError
from ..stages.report import base_model_name, kl_text

ORIGINAL_PPL_TOLERANCE = 1e-3  # relative: the same model, data and protocol on another machine
REQUIRED = ("protocol", "data", "results")


def load_report(path: str | Path) -> dict:
    """An eval report from its JSON file, or from a model folder holding eval_report.json."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "eval_report.json"
    if not path.is_file():
        raise QuantMoeError(f"{path} does not exist; pass an eval_report.json (or the folder that holds one)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise QuantMoeError(f"{path} is not JSON ({exc}); pass an eval_report.json") from None
    missing = [k for k in REQUIRED if not isinstance(report, dict) or k not in report]
    if missing:
        raise QuantMoeError(f"{path} is not a quantmoe eval report (no {missing[0]!r}); "
                            "pass the eval_report.json written by quantmoe quantize or quantmoe eval --report")
    check_fields(report, path)
    return report


def check_fields(report: dict, path: Path) -> None:
    """Raise naming the first field of ``report`` that is missing or of the wrong type: the sections
    are objects, and every number regress reads is a number (NaN allowed here; ``compare`` judges it)."""
    def odd(where: str, want: str) -> QuantMoeError:
        return QuantMoeError(f"{path}: {where} is missing or not {want}; pass an eval_report.json written by "
                             "quantmoe quantize or quantmoe eval --report")

    for section in ("protocol", "data", "results"):
        if not isinstance(report[section], dict):
            raise odd(section, "an object")
    results = report["results"]
    runs = [k for k in ("original", "quantized", "model") if k in results]
    if not any(k in results for k in ("quantized", "model")):
        raise odd("results.quantized", "an object")
    for run in runs:
        if not isinstance(results[run], dict) or not _is_number(results[run].get("perplexity")):
            raise odd(f"results.{run}.perplexity", "a number")
    for section, keys in (("gap", ("relative", "absolute")), ("kl", ("mean", "top1_agreement"))):
        value = report.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise odd(section, "an object")
        for key in keys:
            if not _is_number(value.get(key)):
                raise odd(f"{section}.{key}", "a number")
        se = value.get("relative_se" if section == "gap" else "se")
        if se is not None and not _is_number(se):
            raise odd(f"{section}.{'relative_se' if section == 'gap' else 'se'}", "a number")
    quantization = report.get("quantization", {})
    if not isinstance(quantization, dict):
        raise odd("quantization", "an object")
    for key in ("bits_per_weight", "size_bytes"):
        if quantization.get(key) is not None and not _is_number(quantization[key]):
            raise odd(f"quantization.{key}", "a number")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _not_finite(report: dict) -> list[str]:
    """The judged numbers of a (checked) report that are NaN or infinite, by field."""
    numbers = {f"results.{run}.perplexity": r["perplexity"] for run, r in report["results"].items()
               if isinstance(r, dict) and "perplexity" in r}
    for section, keys in (("gap", ("relative", "absolute")), ("kl", ("mean", "top1_agreement"))):
        numbers.update({f"{section}.{k}": report[section][k] for k in keys if report.get(section)})
    return [name for name, x in numbers.items() if not math.isfinite(x)]


def _differs(name: str, a, b, how: str = "") -> QuantMoeError:
    return QuantMoeError(f"refusing to compare: {name} differs{how} (baseline {a!r}, new {b!r}); "
                         "compare reports of the same model, eval data and protocol")


def check_comparable(base: dict, new: dict) -> None:
    """Raise QuantMoeError naming the first field that makes the two reports incomparable."""
    for section, ignored in (("protocol", {"data"}), ("data", {"path"})):
        a, b = base[section], new[section]
        for key in sorted((set(a) | set(b)) - ignored):
            if a.get(key) != b.get(key):
                raise _differs(f"{section}.{key}", a.get(key), b.get(key))
    has_a, has_b = "original" in base["results"], "original" in new["results"]
    if has_a != has_b:
        which = "the baseline report" if not has_a else "the new report"
        raise QuantMoeError(f"refusing to compare: {which} has no original-model run; "
                            "make both with an original model (quantmoe eval --baseline, or quantize with --eval)")
    if has_a:
        name_a, name_b = base_model_name(str(base.get("baseline"))), base_model_name(str(new.get("baseline")))
        if name_a != name_b:
            raise _differs("baseline (the original model)", name_a, name_b)
        pa, pb = base["results"]["original"]["perplexity"], new["results"]["original"]["perplexity"]
        if abs(pb - pa) > ORIGINAL_PPL_TOLERANCE * abs(pa):
            raise _differs("results.original.perplexity", pa, pb, f" by more than {100 * ORIGINAL_PPL_TOLERANCE:g}%")


def _quantized_ppl(report: dict) -> float:
    r = report["results"]
    return (r.get("quantized") or r.get("model") or {})["perplexity"]


@dataclass
class Comparison:
    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)  # metric, base, new, change, limit, result
    regressions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| metric | baseline | new | change | limit | result |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        verdict = ("**REGRESSION**: " + "; ".join(self.regressions)) if self.regressions else "**no regression**"
        return "\n".join(lines + ["", verdict] + [f"note: {n}" for n in self.notes])


def _gap_text(gap: dict) -> str:
    """+0.220% (± 0.045: the gap's standard error over windows, in reports that have it)."""
    se = gap.get("relative_se")
    return f"{100 * gap['relative']:+.3f}%" + ("" if se is None else f" ± {100 * se:.3f}")


def compare(base: dict, new: dict, max_gap_increase: float = 0.5, max_ppl_increase: float | None = None) -> Comparison:
    """Compare two comparable eval reports (see the module docstring for the definitions)."""
    broken = _not_finite(base) + [f"results.{run}.perplexity" for run, r in base["results"].items()
                                  if isinstance(r, dict) and _is_number(r.get("perplexity")) and r["perplexity"] <= 0]
    if broken:
        raise QuantMoeError(f"the baseline report's {broken[0]} is NaN, infinite or not positive; regenerate the baseline "
                            "(quantmoe eval --report) from a sound model")
    check_comparable(base, new)
    c = Comparison()
    broken = _not_finite(new)
    if broken:
        c.regressions.append(f"the new report's {', '.join(broken)} {'is' if len(broken) == 1 else 'are'} not a "
                             "finite number (the quantized model's output is broken; run quantmoe verify on it)")
    has_gap = base.get("gap") is not None and new.get("gap") is not None
    if not has_gap and max_ppl_increase is None:
        raise QuantMoeError("the reports have no perplexity gap (made without an original model), so "
                            "--max-gap-increase cannot apply; pass --max-ppl-increase PCT")
    if "original" in base["results"]:
        pa, pb = base["results"]["original"]["perplexity"], new["results"]["original"]["perplexity"]
        c.rows.append(("original perplexity", f"{pa:.4f}", f"{pb:.4f}", f"{100 * (pb - pa) / pa:+.3f}%", "", ""))
    qa, qb = _quantized_ppl(base), _quantized_ppl(new)
    ppl_change = 100 * (qb - qa) / qa
    bad = max_ppl_increase is not None and ppl_change > max_ppl_increase
    c.rows.append(("quantized perplexity", f"{qa:.4f}", f"{qb:.4f}", f"{ppl_change:+.3f}%",
                   "-" if max_ppl_increase is None else f"+{max_ppl_increase:g}%",
                   "" if max_ppl_increase is None else ("REGRESSION" if bad else "ok")))
    if bad:
        c.regressions.append(f"quantized perplexity rose {ppl_change:.3f}% (limit {max_ppl_increase:g}%)")
    if has_gap:
        ga, gb = 100 * base["gap"]["relative"], 100 * new["gap"]["relative"]
        bad = gb - ga > max_gap_increase
        c.rows.append(("gap (relative)", _gap_text(base["gap"]), _gap_text(new["gap"]), f"{gb - ga:+.3f} pp",
                       f"+{max_gap_increase:g} pp", "REGRESSION" if bad else "ok"))
        c.rows.append(("gap (absolute)", f"{base['gap']['absolute']:+.4f}", f"{new['gap']['absolute']:+.4f}",
                       f"{new['gap']['absolute'] - base['gap']['absolute']:+.4f}", "", ""))
        if bad:
            c.regressions.append(f"the relative gap grew by {gb - ga:.3f} pp, from {ga:+.3f}% to {gb:+.3f}% "
                                 f"(limit {max_gap_increase:g} pp)")
    ka, kb = base.get("kl"), new.get("kl")
    if ka and kb:
        c.rows.append(("KL to the original (1e-3)", kl_text(ka), kl_text(kb), f"{1000 * (kb['mean'] - ka['mean']):+.2f}",
                       "", ""))
        c.rows.append(("same top token as the original", f"{100 * ka['top1_agreement']:.2f}%",
                       f"{100 * kb['top1_agreement']:.2f}%",
                       f"{100 * (kb['top1_agreement'] - ka['top1_agreement']):+.2f} pp", "", ""))
    sa, sb = base.get("quantization", {}), new.get("quantization", {})
    if sa.get("bits_per_weight") is not None and sb.get("bits_per_weight") is not None:
        c.rows.append(("bits/weight", f"{sa['bits_per_weight']:.3f}", f"{sb['bits_per_weight']:.3f}",
                       f"{sb['bits_per_weight'] - sa['bits_per_weight']:+.3f}", "", ""))
    if sa.get("size_bytes") is not None and sb.get("size_bytes") is not None:
        c.rows.append(("size (MB)", f"{sa['size_bytes'] / 1e6:.2f}", f"{sb['size_bytes'] / 1e6:.2f}",
                       f"{(sb['size_bytes'] - sa['size_bytes']) / 1e6:+.2f}", "", ""))
    if sa.get("label") != sb.get("label"):
        c.notes.append(f"the recipes differ ({sa.get('label')} vs {sb.get('label')})")
    for which, report in (("baseline", base), ("new", new)):
        if report.get("baseline_is_source") is False:
            c.notes.append(f"the {which} report's original is not the model it was quantized from (its manifest "
                           "records another): its gap and KL compare two different models")
    return c
