"""Key regular expressions that cannot hang.

Python's ``re`` backtracks: ``^([a-z_.0-9]+)+!`` takes seconds on one
24-character key and hours on a long one. Key filters come from recipes
people share, so a pattern is accepted only when no repeated part contains
another repetition or an alternation (the shapes that make backtracking
exponential) and it uses no backreferences. Everything a key filter needs
(prefixes, ``.*``, classes, anchors, alternation outside repeats) remains.
"""

from __future__ import annotations

import re
from typing import Any

from modelkit.errors import ModelkitError

MAX_PATTERN = 1000

_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


def _risky(items: Any, inside_repeat: bool) -> str | None:
    for op, arg in items:
        name = str(op)
        if name in ("GROUPREF", "GROUPREF_EXISTS"):
            return "backreferences are not allowed"
        if name in _REPEATS:
            _lo, hi, sub = arg
            if inside_repeat and hi != 1:
                return "a repeated group contains another repetition (like (a+)+)"
            found = _risky(sub, inside_repeat or hi != 1)
            if found:
                return found
        elif name == "BRANCH":
            if inside_repeat:
                return "a repeated group contains an alternation (like (a|b)+)"
            for branch in arg[1]:
                found = _risky(branch, inside_repeat)
                if found:
                    return found
        elif name == "SUBPATTERN":
            found = _risky(arg[-1], inside_repeat)
            if found:
                return found
        elif name in ("ASSERT", "ASSERT_NOT"):
            found = _risky(arg[1], inside_repeat)
            if found:
                return found
    return None


def check_key_regex(pattern: object) -> re.Pattern[str]:
    """Compile ``pattern`` for matching tensor keys, refusing patterns that
    could backtrack exponentially.

    Raises:
        ModelkitError: not a string, not a valid regex, or a risky shape.
    """
    if not isinstance(pattern, str):
        raise ModelkitError(f"a regular expression must be a string, not {pattern!r:.60}")
    if len(pattern) > MAX_PATTERN:
        raise ModelkitError(f"regular expression is {len(pattern)} characters; the limit "
                            f"is {MAX_PATTERN}")
    try:
        compiled = re.compile(pattern)
        from re import _parser  # type: ignore[attr-defined]  # private: typeshed has no stub

        parsed = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ModelkitError(f"bad regex {pattern[:60]!r}: {exc}") from None
    problem = _risky(parsed, False)
    if problem:
        raise ModelkitError(f"regex {pattern[:60]!r} could take exponential time on long "
                            f"keys: {problem}; rewrite it without nesting")
    return compiled
