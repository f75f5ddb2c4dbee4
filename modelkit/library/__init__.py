"""The model library index: what model files a user has, where, and what
they are, kept in SQLite so front ends can list thousands of files at once.

- :func:`~modelkit.library.scan.scan` indexes folders (A1111/Forge, ComfyUI
  or plain layouts), re-reading only changed files.
- :mod:`~modelkit.library.query` lists and finds entries;
  :mod:`~modelkit.library.dupes`, :mod:`~modelkit.library.lineage` and
  :mod:`~modelkit.library.check` answer the library questions.

This package never imports a UI toolkit (textual, rich) or torch.
"""
