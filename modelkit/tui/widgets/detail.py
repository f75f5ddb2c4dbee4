"""The detail pane: tabs for what a file is, its metadata, its lineage tree
and its preview image."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static, TabbedContent, TabPane, Tree

from modelkit.library.lineage import LineageNode
from modelkit.tui.messages import DetailLoaded
from modelkit.tui.render import info_text, metadata_text, safe
from modelkit.tui.widgets.preview import PreviewPane

TABS = ("info", "metadata", "lineage", "preview")


def node_label(node: LineageNode) -> Text:
    """One lineage tree line: name, how it was made, whether it is in the
    library."""
    label = Text(safe(node.label, 80), style="bold" if node.path else "")
    if node.how:
        label.append(f"  {safe(node.how, 80)}", style="cyan")
    if node.match == "name":
        label.append("  (in library, by name only)", style="yellow")
    elif node.match and node.match != "self":
        label.append("  (in library)", style="green")
    elif node.sha256 and node.match is None:
        label.append(f"  (not in library, {node.sha256[:10]})", style="dim")
    if node.note:
        label.append(f"  {safe(node.note, 60)}", style="dim")
    return label


def _fill(tree_node: Any, node: LineageNode) -> None:
    for child in node.children:
        if child.children:
            _fill(tree_node.add(node_label(child), expand=True), child)
        else:
            tree_node.add_leaf(node_label(child))


class DetailPane(Vertical):
    """Tabs: Info, Metadata, Lineage, Preview."""

    def __init__(self, images: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.images = images
        self.path: str | None = None

    def compose(self) -> ComposeResult:
        with TabbedContent(id="detail-tabs"):
            with TabPane("Info", id="info"), VerticalScroll():
                yield Static(Text("select a file", style="dim"), id="info-text")
            with TabPane("Metadata", id="metadata"), VerticalScroll():
                yield Static("", id="metadata-text")
            with TabPane("Lineage", id="lineage"):
                yield Tree(Text("-"), id="lineage-tree")
            with TabPane("Preview", id="preview"):
                yield PreviewPane(self.images, id="preview-pane")

    def focus_content(self) -> None:
        """Focus the shown tab's scrollable content (keys scroll it)."""
        tabs = self.query_one(TabbedContent)
        pane = tabs.get_pane(tabs.active)
        target = next((w for w in pane.query("VerticalScroll, Tree") if w.can_focus), None)
        if target is not None:
            target.focus()

    @property
    def active(self) -> str:
        """The shown tab's id."""
        return self.query_one(TabbedContent).active

    @active.setter
    def active(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def clear_detail(self, message: str) -> None:
        """Show ``message`` instead of a file."""
        self.path = None
        self.query_one("#info-text", Static).update(Text(message, style="dim"))
        self.query_one("#metadata-text", Static).update("")
        tree = self.query_one("#lineage-tree", Tree)
        tree.clear()
        tree.root.set_label(Text("-"))
        self.query_one(PreviewPane).show([])

    def show(self, loaded: DetailLoaded) -> None:
        """Fill every tab from a :class:`DetailLoaded` message."""
        if loaded.detail is None:
            self.clear_detail("this file is no longer in the index (press r to re-scan)")
            return
        self.path = loaded.path
        self.query_one("#info-text", Static).update(info_text(loaded.detail, loaded.hints))
        self.query_one("#metadata-text", Static).update(metadata_text(loaded.detail.metadata))
        tree = self.query_one("#lineage-tree", Tree)
        tree.clear()
        if loaded.lineage is not None:
            tree.root.set_label(node_label(loaded.lineage))
            _fill(tree.root, loaded.lineage)
            if not loaded.lineage.children:
                tree.root.add_leaf(Text("no merge, conversion or training record in its "
                                        "metadata", style="dim"))
            tree.root.expand_all()
        self.query_one(PreviewPane).show(loaded.detail.entry.previews)
