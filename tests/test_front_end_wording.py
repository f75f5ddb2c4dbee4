"""What every front end says comes from modelkit.wording: sizes, block tables and
the one line an error becomes, shared by the CLI, the TUI and the sweep worker
(issue 18)."""

from __future__ import annotations

import pytest

from modelkit.errors import BadFileError, ModelkitError
from modelkit.wording import (
    DEBUG_HINT,
    block_rows,
    error_line,
    error_text,
    human_bytes,
    lora_weights,
    param_count,
)


def test_sizes_counts_and_weights() -> None:
    assert [human_bytes(n) for n in (12, 613_210, 2_130_000_000, 4.5e12)] == [
        "12 B", "613.21 KB", "2.13 GB", "4.50 TB"]
    assert human_bytes(1_500_000, 1) == "1.5 MB"
    assert [param_count(n) for n in (859_520_964, 3_469_000_000, None)] == [
        "859.52 M", "3.469 G", "-"]
    assert lora_weights(0.8, 1.0) == "unet 0.8, te 1"


def test_block_rows_are_aligned_and_shared() -> None:
    weights = {f"IN{i:02d}": i / 10 for i in range(7)} | {"M00": 1 / 3}
    rows = block_rows(weights)
    assert rows == ["  IN00  0       IN01  0.1     IN02  0.2     IN03  0.3     IN04  0.4",
                    "  IN05  0.5     IN06  0.6     M00   0.3333"]
    assert max(len(r) for r in rows) <= 72
    from modelkit.cli.info_cmd import block_table

    assert block_table(weights) == ["  " + r for r in rows]  # the CLI's is the same table


def test_one_error_wording_for_every_front_end() -> None:
    from modelkit.sweep.worker import one_line
    from modelkit.tui.jobs import error_line as tui_error_line

    bad = BadFileError("x.safetensors: truncated header")
    assert error_line(bad) == "modelkit: error: x.safetensors: truncated header"
    assert error_text(bad) == one_line(bad) == "x.safetensors: truncated header"
    bug = ZeroDivisionError("division by zero\nsecond line \x1b[31m")
    assert error_text(bug) == ("internal error: ZeroDivisionError: division by zero\\n"
                               "second line \\x1b[31m")
    assert error_line(bug) == f"modelkit: {error_text(bug)} {DEBUG_HINT}"
    assert tui_error_line is error_line
    assert one_line(bug) == error_text(bug)
    assert error_text(KeyError()) == "internal error: KeyError"
    long = error_text(RuntimeError("x" * 1000))
    assert len(long) == len("internal error: RuntimeError: ") + 300 and long.endswith("...")
    assert len(one_line(ModelkitError("y" * 1000))) == 500


def test_the_cli_prints_the_shared_line_for_a_bug(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    import modelkit.cli as cli

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.delenv("MODELKIT_DEBUG", raising=False)
    monkeypatch.setattr(cli.cli, "main", broken)
    assert cli.main(["methods"]) == 3
    err = capsys.readouterr().err
    assert err == error_line(ZeroDivisionError("division by zero")) + "\n"
    assert err.startswith("modelkit: internal error: ZeroDivisionError: division by zero (set")
