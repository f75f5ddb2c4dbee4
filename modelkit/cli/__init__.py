"""The ``modelkit`` command line: a thin click shell over the library.

Subcommands live in their own modules and are imported only when run, so
``modelkit --help`` stays light (no torch, diffusers or textual).
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
from typing import Any

import click

from modelkit import __version__
from modelkit.textsafe import shown

SUBCOMMANDS = {
    "inspect": ("modelkit.cli.inspect_cmd", "inspect_cmd",
                "Say what a model file is, from its header alone."),
    "hash": ("modelkit.cli.hash_cmd", "hash_cmd",
             "Compute sha256, AutoV2, legacy and tensor-data hashes."),
    "merge": ("modelkit.cli.merge_cmd", "merge_cmd",
              "Merge two or three checkpoints (weighted, add-difference, block-wise...)."),
    "recipe": ("modelkit.cli.merge_cmd", "recipe_group",
               "Run, lock, show and replay merge recipes."),
    "prune": ("modelkit.cli.convert_cmd", "prune_cmd",
              "Drop EMA, schedule buffers and junk; keep markers; repair CLIP ids."),
    "ema": ("modelkit.cli.convert_cmd", "ema_cmd",
            "Use the EMA weights as the UNet; report EMA vs online per block."),
    "quantize": ("modelkit.cli.convert_cmd", "quantize_cmd",
                 "Store components at fp16/bf16/fp8 or int8, with an error report."),
    "dequantize": ("modelkit.cli.convert_cmd", "dequantize_cmd",
                   "Restore an int8/fp8 file to fp16/bf16/fp32."),
    "export-gguf": ("modelkit.cli.convert_cmd", "export_gguf_cmd",
                    "Write the UNet as GGUF q8_0 (ComfyUI-GGUF, stable-diffusion.cpp)."),
    "convert": ("modelkit.cli.convert_cmd", "convert_cmd",
                "ckpt to safetensors; diffusers folder to single file and back."),
    "swap": ("modelkit.cli.convert_cmd", "swap_cmd",
             "Replace the VAE (or UNet, text encoders) with another file's."),
    "extract": ("modelkit.cli.convert_cmd", "extract_cmd",
                "Write one component (vae, unet, te) to its own file."),
    "lora": ("modelkit.cli.lora_cmd", "lora_group",
             "Bake, extract, resize, merge, convert and inspect LoRA adapters."),
    "library": ("modelkit.cli.library_cmd", "library_group",
                "Index model folders; list, dupes, lineage and placement checks."),
    "tui": ("modelkit.cli.tui_cmd", "tui_cmd",
            "Browse, inspect and compare the model library in a terminal UI."),
    "verify": ("modelkit.cli.verify_cmd", "verify_cmd",
               "Check a checkpoint: static checks, offline render, compare to a reference."),
    "sweep": ("modelkit.cli.sweep_cmd", "sweep_cmd",
              "Merge and verify a grid of recipe variants into one table and contact sheet."),
    "demo": ("modelkit.cli.demo_cmd", "demo_cmd",
             "Build a tiny demo model library and run modelkit on it."),
    "methods": ("modelkit.cli.info_cmd", "methods_cmd",
                "List merge methods and operations with their parameters."),
    "presets": ("modelkit.cli.info_cmd", "presets_cmd",
                "List block-weight presets with their values for every family."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        from modelkit.cli.families import add_families

        module, attr, _ = SUBCOMMANDS[name]
        cmd: click.Command = getattr(importlib.import_module(module), attr)
        add_families(cmd, name)
        return cmd

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from modelkit.cli.families import overview

        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(overview())

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelkit")
def cli() -> None:
    """modelkit: inspect, merge, convert and verify Stable Diffusion model files."""


class _Signals:
    """SIGINT, SIGTERM and SIGHUP stop a command the same way: the first one
    raises :class:`~modelkit.errors.Interrupted` where the program is (the
    writer then removes its temp file); later ones are ignored while it
    cleans up, so a second Ctrl-C never interrupts the cleanup or prints a
    traceback.

    The handlers are installed for one :func:`main` call and the previous
    ones are restored when it returns; a signal that lands inside a callback
    the interpreter runs on its own (a gc callback, a finalizer), where a
    raised exception would be lost as "unraisable", only sets the flag."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self) -> None:
        self.received = False
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        self.received = False
        for name in self.NAMES:
            if hasattr(signal, name):
                num = getattr(signal, name)
                self._saved.setdefault(num, signal.getsignal(num))
                signal.signal(num, self.handle)

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        saved, self._saved = self._saved, {}
        for num, old in saved.items():
            signal.signal(num, old if old is not None else signal.SIG_DFL)

    def handle(self, _signum: int, frame: Any) -> None:
        from modelkit.errors import INTERRUPTED, Interrupted, signals_deferred

        if self.received:
            return
        self.received = True
        INTERRUPTED.set()
        if not _importing(frame) and not _in_callback(frame) and not signals_deferred():
            raise Interrupted
        # an exception inside a C extension's import (torch) aborts the
        # interpreter, one inside a gc callback or a finalizer is lost, and a
        # deferred block (a temp file being created) must finish: the flag
        # alone stops the run at its next check

    def ignore(self) -> None:
        """Ignore these signals from now on (the process is exiting)."""
        for name in self.NAMES:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)


def _importing(frame: Any) -> bool:
    """Whether a module is being imported somewhere up the stack."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _in_callback(frame: Any) -> bool:
    """Whether the interpreter is running a gc callback or a finalizer up the
    stack: an exception raised there never reaches the code that was running."""
    import gc

    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _interrupted(started: float) -> str:
    """An honest message: was the output already complete?"""
    from modelkit.cli.common import last_output

    out = last_output()
    if out is not None and out.exists() and out.stat().st_mtime >= started:
        return (f"modelkit: interrupted after {shown(out)} was written; that file is "
                "complete")
    return "modelkit: interrupted; no output was written"


def _one_line(message: str) -> str:
    """Click's own layout inside a message (a missing choice option lists its
    choices as ``Choose from:\n\tfp16,\n\tbf16``) on one line; other control
    characters are left for :func:`shown` to escape."""
    return re.sub(r"([:,])\n\t", r"\1 ", message)


def _remove_temp_files() -> None:
    """Remove temp files an interrupt left between their creation and the
    code that removes them (only if anything was written at all)."""
    writer = sys.modules.get("modelkit.io.writer")
    if writer is not None:
        writer.remove_temp_files()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps modelkit errors to one line and exit codes."""
    import time

    from modelkit.errors import INTERRUPTED

    started = time.time()
    INTERRUPTED.clear()
    _SIGNALS.install()
    try:
        return _main(argv, started)
    finally:
        _SIGNALS.restore()


def _main(argv: list[str] | None, started: float) -> int:
    from modelkit.errors import INTERRUPTED, Interrupted, ModelkitError
    from modelkit.wording import error_line

    try:
        code = cli.main(args=argv, prog_name="modelkit", standalone_mode=False)
        if INTERRUPTED.is_set():  # a signal during an import, seen only now
            raise Interrupted
    except ModelkitError as exc:
        click.echo(error_line(exc), err=True)
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt, Interrupted):
        _remove_temp_files()
        click.echo(_interrupted(started), err=True)
        return 130
    except click.UsageError as exc:  # a bad option or a missing argument: one line
        where = exc.ctx.command_path if exc.ctx else "modelkit"
        click.echo(f"modelkit: error: {shown(_one_line(exc.format_message()))} "
                   f"(see '{where} --help')", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"modelkit: error: {shown(_one_line(exc.format_message()))}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except RecursionError:
        click.echo("modelkit: error: input nested too deeply to process", err=True)
        return 2
    except Exception as exc:  # a bug, not bad input: one line unless debugging
        if os.environ.get("MODELKIT_DEBUG"):
            raise
        click.echo(error_line(exc), err=True)
        return 3
    # with standalone_mode=False click returns a command's exit code (a
    # raised Exit(1) included) instead of exiting: it must not be dropped
    return code if isinstance(code, int) else 0


_SIGNALS = _Signals()


def run() -> None:
    """``modelkit`` console script."""
    # a late signal must not turn the exit code into a kill: what main()
    # restores when it returns is "ignore"
    _SIGNALS.ignore()
    code = main()
    sys.exit(code)
