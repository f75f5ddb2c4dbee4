"""What kind of file a path is, by suffix and by its first bytes, as data.

The model formats themselves are declared in :mod:`modelkit.io.formats`;
this module names them for messages, beside the files that are not models:
what a file's magic bytes say it is (so a PNG given to ``inspect`` is called
a PNG, not a safetensors file with a huge header), and where ComfyUI loads
diffusion-model-only files (GGUF included) from.
"""

from __future__ import annotations

from modelkit.io.formats import FORMATS, GGUF, PICKLE, SAFETENSORS
from modelkit.io.formats import MODEL_SUFFIXES as MODEL_SUFFIXES
from modelkit.io.formats import SNIFF_BYTES as SNIFF_BYTES

# the suffixes of the format table (modelkit.io.formats), by name
SAFETENSORS_SUFFIXES = SAFETENSORS.suffixes
PICKLE_SUFFIXES = PICKLE.suffixes
GGUF_SUFFIXES = GGUF.suffixes

# Where ComfyUI loads a diffusion-model-only file (a UNet/DiT without VAE or
# text encoders, GGUF files included), relative to ComfyUI's folder: the
# "Load Diffusion Model" node and ComfyUI-GGUF's "Unet Loader (GGUF)" both
# read models/diffusion_models (and the legacy models/unet, which ComfyUI
# maps to the same list). README, inspect and `library check` all name this.
COMFYUI_DIFFUSION_MODELS = "models/diffusion_models"

# ``general.architecture`` values ComfyUI-GGUF's loader takes as diffusion
# models (city96/ComfyUI-GGUF loader.py); a GGUF file with one of these is a
# diffusion-model-only file even when modelkit does not know its keys
GGUF_DIFFUSION_ARCHS = frozenset({"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos",
                                  "ltxv", "hyvid", "wan", "lumina2", "qwen_image"})

# what a model format's magic bytes are called in a message
_FORMAT_WORDS = {"gguf": "a GGUF file", "pickle": "a Python pickle (a legacy .ckpt/.pt?)"}
# leading bytes -> what the file is (checked in order)
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    *((m, _FORMAT_WORDS[f.name]) for f in FORMATS.values() for m in f.magic),
)


def sniff(head: bytes) -> str | None:
    """What the file whose first bytes are ``head`` is (``"a PNG image"``),
    or None when the magic bytes are not known."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    for magic, what in MAGIC:
        if head.startswith(magic):
            return what
    return None


__all__ = ["COMFYUI_DIFFUSION_MODELS", "GGUF_DIFFUSION_ARCHS", "GGUF_SUFFIXES",
           "MODEL_SUFFIXES", "PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "sniff"]
