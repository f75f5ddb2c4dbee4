"""The one open: every kind of model input as a :class:`~modelkit.io.source.Source`.

* ``.safetensors``: memory-mapped, read one tensor at a time;
* legacy pickles (``.ckpt``, ``.pt``, ``.pth``, ``.bin``): through the safe
  unpickler (an allow-list; a forbidden class is refused by name);
* diffusers folders: presented in the original single-file layout;
* ``.gguf`` files written for ComfyUI-GGUF: dequantized on read;
* quantized safetensors (ComfyUI's scaled fp8 and int8, bitsandbytes NF4):
  dequantized on read (:mod:`modelkit.io.quantized`).

Which is which is the format table's answer (:mod:`modelkit.io.formats`).
"""

from __future__ import annotations

import os
from pathlib import Path

from modelkit.errors import BadFileError
from modelkit.io.files import check_input_file
from modelkit.io.source import Source


def open_source(path: str | os.PathLike[str], device: str = "cpu") -> Source:
    """Open a model file or diffusers folder for reading on ``device``.

    Raises:
        BadFileError: missing, unreadable, truncated or unsafe input.
    """
    p = Path(path)
    if p.is_dir():
        from modelkit.io.diffusers import is_diffusers_folder, open_diffusers

        if not is_diffusers_folder(p):
            raise BadFileError(f"{p}: is a folder but not a diffusers model (no "
                               "model_index.json, unet/ or transformer/); give a model file")
        return open_diffusers(p, device)
    check_input_file(p)
    from modelkit.io.formats import input_format

    return input_format(p).open(p, device)
