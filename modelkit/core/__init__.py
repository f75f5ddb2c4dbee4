"""Layer 3: the transform registry, recipes and their validation, planned
steps and key regexes (no file is opened here; see docs/architecture.md)."""
