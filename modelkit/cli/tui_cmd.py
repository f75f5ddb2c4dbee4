"""``modelkit tui``."""

from __future__ import annotations

import click

EPILOG = """\b
Examples:
  modelkit tui ~/stable-diffusion-webui          scan, then browse that library
  modelkit tui                                   browse everything indexed so far
  modelkit tui --db /tmp/lib.sqlite models/
"""
THEMES = ("ansi-dark", "ansi-light", "textual-dark", "textual-light")


@click.command("tui", epilog=EPILOG)
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False,
                                                  path_type=str))
@click.option("--db", type=click.Path(dir_okay=False, path_type=str),
              help="Library index file [default: library.sqlite in $MODELKIT_CACHE_DIR "
                   "or ~/.cache/modelkit].")
@click.option("--theme", type=click.Choice(THEMES), default="ansi-dark", show_default=True,
              help="Colours: ansi-* use the terminal's own palette.")
@click.option("--no-images", is_flag=True,
              help="Never draw preview images (describe them instead).")
def tui_cmd(dirs: tuple[str, ...], db: str | None, theme: str, no_images: bool) -> None:
    """Browse, inspect and compare the model library in a terminal UI.

    DIRS are scanned first (only changed files are read) and the table shows
    the files under them; without DIRS it shows the whole index. Keys are
    listed at the bottom; ? shows them all.
    """
    from multiprocessing import resource_tracker

    from modelkit.tui.app import make_app
    from modelkit.tui.widgets.preview import prepare_terminal

    # both need the real terminal, which Textual takes over (and replaces
    # sys.stderr): textual-image asks it what it can draw, and the tracker
    # that the scan's worker processes need inherits its stderr
    images = not no_images and prepare_terminal()
    resource_tracker.ensure_running()
    make_app(dirs, db, images=images, theme=theme).run()
