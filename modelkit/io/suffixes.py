"""What kind of file a path is, by suffix and by its first bytes, as data.

One place for the file-kind knowledge the library scan, ``inspect`` and the
readers share: which suffixes are model files, what a file's magic bytes
say it is (so a PNG given to ``inspect`` is called a PNG, not a safetensors
file with a huge header), and where ComfyUI loads diffusion-model-only files
(GGUF included) from.
"""

from __future__ import annotations

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
GGUF_SUFFIXES = (".gguf",)
# files the library scan indexes
MODEL_SUFFIXES = (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES, *GGUF_SUFFIXES)

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

# leading bytes -> what the file is (checked in order)
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"GGUF", "a GGUF file"),
    (b"\x80\x02", "a Python pickle (a legacy .ckpt/.pt?)"),
    (b"\x80\x03", "a Python pickle (a legacy .ckpt/.pt?)"),
    (b"\x80\x04", "a Python pickle (a legacy .ckpt/.pt?)"),
    (b"\x80\x05", "a Python pickle (a legacy .ckpt/.pt?)"),
)
SNIFF_BYTES = 16


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
