"""How a claim's figure and verdict are computed from benchmark records: selectors, a small
arithmetic language, and verdict rules. All of it is data in ``claims.json``; nothing here knows
any result.

A **selector** picks one number from the records (``benchmarks/results/*.json``): a file, a
filter on record fields (``where``, with ``method`` as a shorthand), a dotted ``field`` path, and
optionally an aggregate over every matching record (``agg``: min, max, count, mean), where
``at_most``/``at_least`` bound numeric fields.

The **figure** is an arithmetic expression over the selectors' names (+ - * / **, and the
functions ``min max abs log exp rank dist``), parsed with ``ast`` and evaluated by walking the
tree: never ``eval``.

A **rule** turns the figure into a verdict: ``at_least``, ``at_most`` or ``within`` with a
``holds`` bound and a looser ``partly`` bound, or ``not_measurable`` with its reason; ``cap``
limits the verdict where the measurement can only confirm part of the claim (the reason is
stated in the data).

>>> records = {"a.json": [{"method": "x", "kl": 2.0}, {"method": "y", "kl": 0.5}]}
>>> values = select_all({"k": {"file": "a.json", "method": "y", "field": "kl"}}, records)
>>> figure = evaluate_expression("1 - k / 2", values)
>>> figure, apply_rule({"kind": "at_least", "holds": 0.7, "partly": 0.5}, figure)[0]
(0.75, 'holds')
"""
from __future__ import annotations

import ast
import math
import operator
from typing import Any, Mapping

from uqcit.core.keys import ConfigError, check_keys

HOLDS, PARTLY, FAILS = "holds", "partly", "does not hold"
NOT_MEASURABLE, NOT_MEASURED = "not measurable here", "not measured yet"
VERDICTS = (HOLDS, PARTLY, FAILS, NOT_MEASURABLE, NOT_MEASURED)
_ORDER = {HOLDS: 0, PARTLY: 1, FAILS: 2}


class MissingRecord(LookupError):
    """A selector found no record (or no value): the claim is not measured yet."""


class UndefinedFigure(ArithmeticError):
    """The figure cannot be computed from the values (a division by zero, a log of zero)."""


def _get(record: Mapping[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def matches(record: Mapping[str, Any], sel: Mapping[str, Any]) -> bool:
    """Whether ``record`` passes the selector's filters (``where``/``method``, ``at_most``, ``at_least``).

    >>> matches({"method": "m", "bpw": 3.0}, {"method": "m", "at_most": {"bpw": 4}})
    True
    """
    where = dict(sel.get("where", {}))
    if "method" in sel:
        where["method"] = sel["method"]
    if any(_get(record, k) != v for k, v in where.items()):
        return False
    for key, bound in sel.get("at_most", {}).items():
        v = _get(record, key)
        if not isinstance(v, (int, float)) or v > bound:
            return False
    for key, bound in sel.get("at_least", {}).items():
        v = _get(record, key)
        if not isinstance(v, (int, float)) or v < bound:
            return False
    return True


SELECTOR_KEYS = {"file", "files", "method", "where", "at_most", "at_least", "field", "agg"}


def select(sel: Mapping[str, Any], records: Mapping[str, list[dict[str, Any]]]) -> tuple[float, list[dict]]:
    """The number ``sel`` picks from ``records`` (file name -> list of records), and the records used.

    Raises ``MissingRecord`` naming the file and filter when nothing matches.

    >>> select({"file": "f.json", "at_most": {"bpw": 4}, "field": "top1", "agg": "max"},
    ...        {"f.json": [{"bpw": 3, "top1": 20.0}, {"bpw": 4, "top1": 50.0}, {"bpw": 6, "top1": 90.0}]})[0]
    50.0
    """
    check_keys(sel, SELECTOR_KEYS, "selector", required=("field",))
    files = sel.get("files") or [sel.get("file")]
    if not all(isinstance(f, str) for f in files):
        raise ConfigError(f"selector {dict(sel)}: needs 'file' or 'files'")
    missing_files = [f for f in files if f not in records]
    if len(missing_files) == len(files):
        raise MissingRecord(f"no record file {', '.join(files)}")
    used = [r for f in files if f in records for r in records[f] if matches(r, sel)]
    found = [(r, _get(r, sel["field"])) for r in used]
    found = [(r, v) for r, v in found if v is not None]
    what = " / ".join(files) + (f" {sel['method']}" if "method" in sel else "") + \
        (f" where {sel['where']}" if "where" in sel else "")
    agg = sel.get("agg")
    if agg == "count":
        return float(len(found)), [r for r, _ in found]
    if not found:
        raise MissingRecord(f"no value of {sel['field']!r} in {what}")
    if agg is None:
        if len(found) > 1:
            raise ConfigError(f"selector {what}: {len(found)} records match; add a filter or an 'agg'")
        r, v = found[0]
        return _number(v, what), [r]
    numbers = [_number(v, what) for _, v in found]
    aggregates = {"max": max, "min": min, "mean": lambda xs: sum(xs) / len(xs)}
    if agg not in aggregates:
        raise ConfigError(f"selector {what}: agg must be one of {sorted(aggregates) + ['count']}, got {agg!r}")
    return float(aggregates[agg](numbers)), [r for r, _ in found]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    return float(value)


def select_all(selectors: Mapping[str, Mapping[str, Any]],
               records: Mapping[str, list[dict[str, Any]]]) -> dict[str, float]:
    """``select`` for each named selector; raises ``MissingRecord`` on the first one missing."""
    return {name: select(sel, records)[0] for name, sel in selectors.items()}


def _rank(x: float, *others: float) -> float:
    """1-based rank of ``x`` among ``x, *others``, ascending (1: the smallest)."""
    return 1.0 + sum(1 for o in others if o < x)


def _dist(x: float, lo: float, hi: float) -> float:
    """How far ``x`` lies outside ``[lo, hi]`` (0 inside)."""
    return max(lo - x, 0.0, x - hi)


FUNCTIONS = {"min": min, "max": max, "abs": abs, "log": math.log, "exp": math.exp, "rank": _rank, "dist": _dist}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}


def evaluate_expression(text: str, values: Mapping[str, float]) -> float:
    """The value of ``text`` (arithmetic over ``values``' names and ``FUNCTIONS``).

    >>> evaluate_expression("rank(b, a, c) + dist(5, 1, 3)", {"a": 1.0, "b": 2.0, "c": 3.0})
    4.0
    >>> evaluate_expression("a / 0", {"a": 1.0})
    Traceback (most recent call last):
    ...
    uqcit.validation.rules.UndefinedFigure: a / 0: division by zero
    """
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"figure expression {text!r} is not valid: {exc.msg}") from None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in values:
                raise ConfigError(f"figure expression {text!r} names {node.id!r}, which no selector defines")
            return values[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS \
                and not node.keywords:
            return float(FUNCTIONS[node.func.id](*(walk(a) for a in node.args)))
        raise ConfigError(f"figure expression {text!r}: {ast.dump(node)[:60]} is not allowed "
                          f"(numbers, selector names, + - * / **, {sorted(FUNCTIONS)})")

    try:
        return walk(tree)
    except ZeroDivisionError:
        raise UndefinedFigure(f"{text}: division by zero") from None
    except (ValueError, OverflowError) as exc:  # log(0), exp overflow
        raise UndefinedFigure(f"{text}: {exc}") from None


RULE_KEYS = {"kind", "holds", "partly", "reason", "cap"}


def apply_rule(rule: Mapping[str, Any], figure: float | None) -> tuple[str, str]:
    """``(verdict, why)`` for ``figure`` under ``rule`` (see the module docstring).

    >>> apply_rule({"kind": "within", "holds": [0.05, 0.08], "partly": [0.025, 0.16]}, 0.048)
    ('partly', '0.048 is outside [0.05, 0.08] (holds) but is inside [0.025, 0.16] (partly)')
    >>> apply_rule({"kind": "at_most", "holds": 1, "cap": {"verdict": "partly", "reason": "one run"}}, 1.0)
    ('partly', '1 <= 1 (holds); capped at partly: one run')
    """
    check_keys(rule, RULE_KEYS, "rule", required=("kind",))
    kind = rule["kind"]
    if kind == "not_measurable":
        return NOT_MEASURABLE, str(rule.get("reason", ""))
    if figure is None:
        raise ValueError("a measurable rule needs a figure")
    f = _show(figure)
    tests = {
        "at_least": (lambda b: figure >= b, lambda b: f"{f} >= {_show(b)}", lambda b: f"{f} < {_show(b)}"),
        "at_most": (lambda b: figure <= b, lambda b: f"{f} <= {_show(b)}", lambda b: f"{f} > {_show(b)}"),
        "within": (lambda b: b[0] <= figure <= b[1], lambda b: f"{f} is inside [{_show(b[0])}, {_show(b[1])}]",
                   lambda b: f"{f} is outside [{_show(b[0])}, {_show(b[1])}]"),
    }
    if kind not in tests:
        raise ConfigError(f"rule kind must be one of {sorted(tests) + ['not_measurable']}, got {kind!r}")
    ok, yes, no = tests[kind]
    if ok(rule["holds"]):
        verdict, why = HOLDS, f"{yes(rule['holds'])} (holds)"
    elif "partly" in rule and ok(rule["partly"]):
        verdict, why = PARTLY, f"{no(rule['holds'])} (holds) but {yes(rule['partly']).removeprefix(f + ' ')} (partly)"
    else:
        verdict = FAILS
        why = f"{no(rule['holds'])} (holds)" + (f" and {no(rule['partly']).removeprefix(f + ' ')} (partly)"
                                              if "partly" in rule else "")
    cap = rule.get("cap")
    if cap and _ORDER[verdict] < _ORDER[cap["verdict"]]:
        verdict, why = cap["verdict"], f"{why}; capped at {cap['verdict']}: {cap['reason']}"
    return verdict, why


def _show(x: float) -> str:
    """A figure as the reasons print it: 4 significant digits."""
    return f"{x:.4g}"
