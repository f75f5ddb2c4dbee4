"""The TUI's screens: library (main), compare, help and the error dialog."""
