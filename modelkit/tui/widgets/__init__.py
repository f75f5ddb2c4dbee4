"""Widgets of the TUI: the library table, detail pane, preview and job bar."""
