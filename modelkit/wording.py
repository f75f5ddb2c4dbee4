"""How modelkit words things for people, in one place for every front end
(the CLI, the TUI, the sweep worker's records): sizes, parameter counts,
block-weight tables and the one line an error becomes.

Layer 0: plain strings, nothing above :mod:`modelkit.errors` and
:mod:`modelkit.textsafe` is imported; text that came from files or
exceptions passes through :func:`~modelkit.textsafe.shown`.
"""

from __future__ import annotations

from collections.abc import Mapping

from modelkit.errors import ModelkitError
from modelkit.textsafe import shown

PROGRAM = "modelkit"
DEBUG_HINT = "(set MODELKIT_DEBUG=1 for a traceback and report it)"
BUG_LIMIT = 300  # characters of a bug's message: its type and the start say enough
BLOCKS_PER_ROW = 5  # cells of a block-weight table: 14 columns each, 72 with the indent


def human_bytes(n: float, digits: int = 2) -> str:
    """``n`` bytes with a decimal unit: ``2.13 GB``, ``613.21 KB``, ``12 B``."""
    for suffix in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} B" if suffix == "B" else f"{n:.{digits}f} {suffix}"
        n /= 1000
    return f"{n:.{digits}f} TB"


def param_count(n: int | None) -> str:
    """A parameter count: ``859.52 M``, ``3.469 G``; ``-`` when unknown."""
    if n is None:
        return "-"
    return f"{n / 1e6:,.2f} M" if n < 1e9 else f"{n / 1e9:,.3f} G"


def block_rows(weights: Mapping[str, float], indent: str = "  ",
               per_row: int = BLOCKS_PER_ROW) -> list[str]:
    """Block weights as aligned rows of ``NAME value`` cells
    (``IN00  0.5     IN01  0.5 ...``), :data:`BLOCKS_PER_ROW` a row."""
    cells = [f"{name:<5} {value:<7.4g}" for name, value in weights.items()]
    return [(indent + " ".join(cells[i:i + per_row])).rstrip()
            for i in range(0, len(cells), per_row)]


def lora_weights(weight: float, te_weight: float) -> str:
    """The strengths a LoRA is applied at: ``unet 0.8, te 1``."""
    return f"unet {weight:g}, te {te_weight:g}"


def is_bug(exc: BaseException) -> bool:
    """Whether ``exc`` is a bug (anything but a :class:`ModelkitError`, which
    says what is wrong with the input and what to do)."""
    return not isinstance(exc, ModelkitError)


def error_text(exc: BaseException, limit: int | None = None) -> str:
    """``exc`` as one line without the program's name: a
    :class:`ModelkitError` its message; a bug ``internal error: TYPE:
    message`` (cut to :data:`BUG_LIMIT`). Control characters are escaped,
    so the line stays one line; ``limit`` cuts the whole of it."""
    if not is_bug(exc):
        return shown(exc, limit)
    head, message = f"internal error: {type(exc).__name__}", shown(exc, BUG_LIMIT)
    return shown(f"{head}: {message}" if message else head, limit)


def error_line(exc: BaseException) -> str:
    """What a front end shows for an error that ended a command (the CLI on
    stderr, the TUI in its dialog): ``modelkit: error: MESSAGE``, or for a
    bug ``modelkit: internal error: TYPE: message (set MODELKIT_DEBUG=1 ...)``."""
    if is_bug(exc):
        return f"{PROGRAM}: {error_text(exc)} {DEBUG_HINT}"
    return f"{PROGRAM}: error: {error_text(exc)}"
