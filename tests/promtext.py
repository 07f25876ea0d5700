# A strict reader of the Prometheus text exposition format (version 0.0.4),
# written for the tests from the format's description: anything the format
# does not allow is an error here, so output that passes parses anywhere.
# Histograms too: their _bucket/_sum/_count samples belong to the family,
# every series has increasing `le` bounds ending in +Inf, cumulative counts,
# and a _count equal to its +Inf bucket.
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class FormatError(Exception):
    pass


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str | None = None
    samples: dict[frozenset[tuple[str, str]], float] = field(default_factory=dict)
    #: Histograms only: per series (labels without le), its buckets in order.
    buckets_of: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = field(
        default_factory=dict
    )
    #: Histograms only: (suffix, labels) -> value, for _sum and _count.
    totals: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def value(self, **labels: str) -> float:
        return self.samples[frozenset(labels.items())]

    def buckets(self, **labels: str) -> list[tuple[float, float]]:
        """A histogram series' (le, cumulative count) pairs, in order."""
        return self.buckets_of[frozenset(labels.items())]

    def sum(self, **labels: str) -> float:
        return self.totals[("_sum", frozenset(labels.items()))]

    def count(self, **labels: str) -> float:
        return self.totals[("_count", frozenset(labels.items()))]


HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _family_of(name: str, families: dict[str, Family]) -> tuple[Family, str]:
    """The family a sample belongs to, and its histogram suffix ("" for others)."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and base in families and families[base].type == "histogram":
            return families[base], suffix
    fam = families.setdefault(name, Family(name))
    if fam.type == "histogram":
        raise FormatError(f"a sample of histogram {name} without _bucket, _sum or _count")
    return fam, ""


def _histogram_sample(fam: Family, suffix: str, labels: dict[str, str], value: float) -> None:
    if suffix != "_bucket":
        if "le" in labels:
            raise FormatError(f"{fam.name}{suffix} has an le label")
        key = (suffix, frozenset(labels.items()))
        if key in fam.totals:
            raise FormatError(f"series {fam.name}{suffix}{labels} twice")
        fam.totals[key] = value
        return
    if "le" not in labels:
        raise FormatError(f"{fam.name}_bucket without an le label")
    le = _value(labels.pop("le"), f"le of {fam.name}")
    if math.isnan(le):
        raise FormatError(f"{fam.name}_bucket with le NaN")
    series = fam.buckets_of.setdefault(frozenset(labels.items()), [])
    if series and le <= series[-1][0]:
        raise FormatError(f"{fam.name}_bucket{labels}: le {le} not above {series[-1][0]}")
    if series and value < series[-1][1]:
        raise FormatError(f"{fam.name}_bucket{labels}: counts are not cumulative")
    series.append((le, value))


def _check_histogram(fam: Family) -> None:
    keys = set(fam.buckets_of) | {labels for _, labels in fam.totals}
    for labels in keys:
        where = f"{fam.name}{dict(labels)}"
        series = fam.buckets_of.get(labels)
        if not series or series[-1][0] != math.inf:
            raise FormatError(f'{where} has no le="+Inf" bucket')
        for suffix in ("_sum", "_count"):
            if (suffix, labels) not in fam.totals:
                raise FormatError(f"{where} has no {suffix}")
        if fam.totals[("_count", labels)] != series[-1][1]:
            raise FormatError(f"{where}: _count differs from the +Inf bucket")


def _unescape(text: str, allowed: str, where: str) -> str:
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text) or text[i + 1] not in allowed:
                raise FormatError(f"bad escape in {where}: {text!r}")
            out.append("\n" if text[i + 1] == "n" else text[i + 1])
            i += 2
            continue
        if c == "\n":
            raise FormatError(f"raw newline in {where}")
        out.append(c)
        i += 1
    return "".join(out)


def _value(text: str, line: str) -> float:
    if text in ("NaN", "+Inf", "-Inf"):
        return {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}[text]
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        raise FormatError(f"bad value {text!r} in {line!r}")
    return float(text)


def _labels(text: str, line: str) -> dict[str, str]:
    """Parse 'a="x",b="y"' (a trailing comma is allowed)."""
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        eq = text.find("=", i)
        if eq < 0:
            raise FormatError(f"label without '=' in {line!r}")
        name = text[i:eq]
        if not LABEL_NAME.match(name) or name.startswith("__"):
            raise FormatError(f"bad label name {name!r} in {line!r}")
        if name in labels:
            raise FormatError(f"label {name!r} twice in {line!r}")
        if eq + 1 >= len(text) or text[eq + 1] != '"':
            raise FormatError(f"unquoted label value in {line!r}")
        j = eq + 2
        raw = []
        while True:
            if j >= len(text):
                raise FormatError(f"unterminated label value in {line!r}")
            if text[j] == "\\":
                raw.append(text[j : j + 2])
                j += 2
                continue
            if text[j] == '"':
                break
            raw.append(text[j])
            j += 1
        labels[name] = _unescape("".join(raw), '\\"n', "a label value")
        j += 1
        if j < len(text):
            if text[j] != ",":
                raise FormatError(f"expected ',' after a label in {line!r}")
            j += 1
        i = j
    return labels


def _sample(line: str) -> tuple[str, dict[str, str], float]:
    if "{" in line.split(" ", 1)[0]:
        name, rest = line.split("{", 1)
        close = _closing_brace(rest, line)
        labels = _labels(rest[:close], line)
        tail = rest[close + 1 :]
    else:
        name, _, tail = line.partition(" ")
        tail = " " + tail
        labels = {}
    if not METRIC_NAME.match(name):
        raise FormatError(f"bad metric name {name!r}")
    if not tail.startswith(" "):
        raise FormatError(f"no space before the value in {line!r}")
    parts = tail[1:].split(" ")
    if not 1 <= len(parts) <= 2 or "" in parts:
        raise FormatError(f"expected a value and an optional timestamp in {line!r}")
    if len(parts) == 2 and not re.fullmatch(r"-?\d+", parts[1]):
        raise FormatError(f"bad timestamp in {line!r}")
    return name, labels, _value(parts[0], line)


def _closing_brace(rest: str, line: str) -> int:
    in_string = False
    i = 0
    while i < len(rest):
        c = rest[i]
        if in_string and c == "\\":
            i += 2
            continue
        if c == '"':
            in_string = not in_string
        elif c == "}" and not in_string:
            return i
        i += 1
    raise FormatError(f"no closing brace in {line!r}")


def parse(text: str) -> dict[str, Family]:
    """Every family in *text*; raises FormatError on anything the format does not allow."""
    if text and not text.endswith("\n"):
        raise FormatError("the exposition must end with a newline")
    families: dict[str, Family] = {}
    order: list[str] = []  # families in the order their samples appear
    for line in text.split("\n")[:-1]:
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not METRIC_NAME.match(name):
                    raise FormatError(f"bad metric name {name!r} in {line!r}")
                fam = families.setdefault(name, Family(name))
                if name in order:
                    raise FormatError(f"{parts[1]} for {name} after its samples")
                if parts[1] == "HELP":
                    if fam.help is not None:
                        raise FormatError(f"second HELP for {name}")
                    fam.help = _unescape(parts[3] if len(parts) > 3 else "", "\\n", "HELP")
                else:
                    kind = parts[3] if len(parts) > 3 else ""
                    if kind not in TYPES or fam.type != "untyped":
                        raise FormatError(f"bad or second TYPE in {line!r}")
                    fam.type = kind
            continue
        name, labels, value = _sample(line)
        fam, suffix = _family_of(name, families)
        if fam.name not in order:
            order.append(fam.name)
        elif order[-1] != fam.name:
            raise FormatError(f"samples of {fam.name} are not together")
        if suffix:
            _histogram_sample(fam, suffix, labels, value)
            continue
        key = frozenset(labels.items())
        if key in fam.samples:
            raise FormatError(f"series {name}{labels} twice")
        fam.samples[key] = value
    for fam in families.values():
        if fam.type == "histogram":
            _check_histogram(fam)
    return families
