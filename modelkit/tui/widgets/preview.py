"""The preview sidecar image (``name.png``, ``name.preview.png``).

Images are drawn with textual-image (sixel, kitty graphics or coloured
half-cells) when it is installed and :func:`prepare_terminal` ran before the
app started (it asks the terminal what it supports, which is impossible once
Textual owns the terminal). Otherwise, and in headless tests, the pane says
what the image is and where it lives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Container
from textual.widgets import Static

from modelkit.textsafe import safe_text

_IMAGE_CLASS: list[Any] = []  # the textual-image widget class, once prepared


def prepare_terminal() -> bool:
    """Import textual-image (it queries the terminal); call before
    ``App.run()``. Returns whether images can be drawn."""
    if _IMAGE_CLASS:
        return True
    try:
        from textual_image.widget import Image
    except Exception:  # not installed, or the terminal could not be queried
        return False
    _IMAGE_CLASS.append(Image)
    return True


def _describe(path: Path) -> str:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return f"{im.width}x{im.height} {im.format}"
    except Exception:
        return "unreadable image"


class PreviewPane(Container):
    """Shows the first preview image of a file, or a text fallback."""

    def __init__(self, images: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.images = images

    def compose(self) -> ComposeResult:
        yield Static(Text("no file selected", style="dim"), id="preview-text")

    def show(self, previews: tuple[str, ...] | list[str]) -> None:
        """Show the first of ``previews`` (paths), or say there is none."""
        for child in list(self.query(".preview-image")):
            child.remove()
        text = self.query_one("#preview-text", Static)
        if not previews:
            text.update(Text("no preview image (name.png or name.preview.png beside the "
                             "file)", style="dim"))
            return
        path = Path(previews[0])
        line = Text()
        line.append(safe_text(path.name), style="bold")
        line.append(f"  {_describe(path)}")
        if len(previews) > 1:
            line.append(f"  (+{len(previews) - 1} more)", style="dim")
        if self.images and _IMAGE_CLASS:
            text.update(line)
            self.mount(_IMAGE_CLASS[0](str(path), classes="preview-image"))
        else:
            line.append("\nthis terminal cannot show images here; open it in a viewer:\n",
                        style="dim")
            line.append(safe_text(str(path)))
            text.update(line)
