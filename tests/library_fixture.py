"""A tiny model library on disk for the library and TUI tests: an A1111
install and a ComfyUI models folder, built from the session's tiny models
(hard links, so nothing big is written twice), with the cases the index must
tell apart: copies, a renamed copy with other metadata, merges with modelkit
and A1111 provenance, a converted file, misplaced and broken files."""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from pathlib import Path

from modelkit.io.hashing import hash_file


@functools.cache
def sha256(path: Path) -> str:
    return hash_file(path, tensor_hash=False).sha256

# relative path -> (kind, arch, layout, role) after a scan
EXPECTED = {
    "webui/models/Stable-diffusion/sd15.safetensors": ("checkpoint", "sd1", "a1111",
                                                        "checkpoint"),
    "webui/models/Stable-diffusion/sd15-b.safetensors": ("checkpoint", "sd1", "a1111",
                                                          "checkpoint"),
    "webui/models/Stable-diffusion/sd15-copy.safetensors": ("checkpoint", "sd1", "a1111",
                                                             "checkpoint"),
    "webui/models/Stable-diffusion/sd15-renamed.safetensors": ("checkpoint", "sd1", "a1111",
                                                                "checkpoint"),
    "webui/models/Stable-diffusion/merged.safetensors": ("checkpoint", "sd1", "a1111",
                                                          "checkpoint"),
    "webui/models/Stable-diffusion/merged-pruned.safetensors": ("checkpoint", "sd1", "a1111",
                                                                 "checkpoint"),
    "webui/models/Stable-diffusion/a1111-merge.safetensors": ("checkpoint", "sd1", "a1111",
                                                               "checkpoint"),
    "webui/models/Stable-diffusion/sdxl-unet.safetensors": ("unet", "sdxl", "a1111",
                                                             "checkpoint"),
    "webui/models/Stable-diffusion/broken.safetensors": ("broken", "unknown", "a1111",
                                                          "checkpoint"),
    "webui/models/Lora/style.safetensors": ("lora", "sd1", "a1111", "lora"),
    "webui/models/Lora/misfiled-vae.safetensors": ("vae", "unknown", "a1111", "lora"),
    "webui/models/Lora/SD1.5/xl-detail.safetensors": ("lora", "sdxl", "a1111", "lora"),
    "webui/models/VAE/vae.safetensors": ("vae", "unknown", "a1111", "vae"),
    "webui/embeddings/negative.safetensors": ("embedding", "sd1", "a1111", "embedding"),
    "comfy/models/checkpoints/sdxl.safetensors": ("checkpoint", "sdxl", "comfyui",
                                                   "checkpoint"),
    "comfy/models/checkpoints/sdxl-unet-here.safetensors": ("unet", "sdxl", "comfyui",
                                                             "checkpoint"),
    "comfy/models/loras/sdxl-detail.safetensors": ("lora", "sdxl", "comfyui", "lora"),
}
TAGS = {"my style": {"1girl": 30, "solo": 12, "outdoors": 5}}
EVIL = "evil\x1b]0;pwned\x07\x1b[2J"


def link(src: Path, dst: Path) -> Path:
    """Hard-link (or copy) ``src`` to ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def with_metadata(src: Path, dst: Path, metadata: dict[str, str]) -> Path:
    """``src``'s tensors with another ``__metadata__`` (same tensor data)."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return dst


def _recipe(a: Path, b: Path, sha_a: str, sha_b: str) -> str:
    return (f"version: 1\ninputs:\n  a: {{path: {a}, sha256: {sha_a}}}\n"
            f"  b: {{path: {b}, sha256: {sha_b}}}\nsteps:\n  mix:\n"
            "    method: weighted_sum\n    models: [a, b]\n    params: {alpha: 0.3}\n"
            "output: {path: merged.safetensors, dtype: fp16, step: mix}\n")


def merge_metadata(a: Path, b: Path) -> dict[str, str]:
    """Provenance as ``modelkit merge`` writes it (recipe, inputs, A1111 fields)."""
    sha_a, sha_b = sha256(a), sha256(b)
    inputs = {"a": {"file": a.name, "sha256": sha_a}, "b": {"file": b.name, "sha256": sha_b}}
    a1111 = {"type": "modelkit", "interp_method": "weighted_sum",
             "primary_model_hash": sha_a, "secondary_model_hash": sha_b, "multiplier": 0.3}
    models = {sha_a: {"name": a.stem, "legacy_hash": "", "sd_merge_recipe": None},
              sha_b: {"name": b.stem, "legacy_hash": "", "sd_merge_recipe": None}}
    return {"modelkit.recipe": _recipe(a, b, sha_a, sha_b), "modelkit.version": "0.1.0",
            "modelkit.inputs": json.dumps(inputs), "sd_merge_recipe": json.dumps(a1111),
            "sd_merge_models": json.dumps(models), "format": "pt"}


def a1111_metadata(a: Path) -> dict[str, str]:
    """Provenance as A1111's checkpoint merger writes it: ``a`` and an older
    merge that is not in the library, whose own recipe is embedded."""
    sha_a = sha256(a)
    old, grand_a, grand_b = "3" * 64, "1" * 64, "2" * 64
    parent = {"interp_method": "Add difference", "primary_model_hash": grand_a,
              "secondary_model_hash": grand_b, "multiplier": 1.0}
    recipe = {"type": "webui", "interp_method": "Weighted sum", "multiplier": 0.5,
              "primary_model_hash": sha_a, "secondary_model_hash": old}
    models = {sha_a: {"name": a.stem, "legacy_hash": "", "sd_merge_recipe": None},
              old: {"name": "old-merge", "legacy_hash": "", "sd_merge_recipe": parent},
              grand_a: {"name": "grand-a", "legacy_hash": "", "sd_merge_recipe": None},
              grand_b: {"name": "grand-b", "legacy_hash": "", "sd_merge_recipe": None}}
    return {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}


def build_library(root: Path, models: dict[str, Path]) -> Path:
    """Write the fixture library under ``root``; returns ``root``."""
    from modelkit.engine.provenance import HISTORY_KEY
    from modelkit.testing.lora import write_lora

    sd = root / "webui/models/Stable-diffusion"
    sd15 = link(models["sd1"], sd / "sd15.safetensors")
    sd15b = link(models["sd1_b"], sd / "sd15-b.safetensors")
    shutil.copyfile(sd15, sd / "sd15-copy.safetensors")
    with_metadata(sd15, sd / "sd15-renamed.safetensors", {"note": "same tensors"})
    merged = with_metadata(models["sd1_inpaint"], sd / "merged.safetensors",
                           merge_metadata(sd15, sd15b))
    meta = merge_metadata(sd15, sd15b)
    meta[HISTORY_KEY] = json.dumps([{"op": "prune", "params": {"keep_ema": False},
                                     "inputs": [{"file": merged.name,
                                                 "sha256": sha256(merged)}],
                                     "version": "0.1.0"}])
    with_metadata(models["sd1_pix2pix"], sd / "merged-pruned.safetensors", meta)
    with_metadata(models["sd1_ema"], sd / "a1111-merge.safetensors", a1111_metadata(sd15))
    link(models["sdxl_unet"], sd / "sdxl-unet.safetensors")
    (sd / "broken.safetensors").write_bytes(sd15.read_bytes()[:100_000])
    lora = root / "webui/models/Lora"
    (lora / "SD1.5").mkdir(parents=True)
    write_lora(lora / "style.safetensors", "sd1", seed=10, metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": "4",
        "ss_output_name": EVIL, "ss_sd_model_name": "sd15.safetensors",
        "ss_num_epochs": "10", "ss_tag_frequency": json.dumps(TAGS),
        "modelspec.title": "Style [bold]LoRA[/bold]"})
    _preview(lora / "style.preview.png")
    (lora / "style.civitai.info").write_text(json.dumps(
        {"name": "v1.0", "baseModel": "SD 1.5", "trainedWords": ["mystyle"],
         "model": {"name": "My Style", "type": "LORA"}}))
    link(models["vae"], lora / "misfiled-vae.safetensors")
    write_lora(lora / "SD1.5/xl-detail.safetensors", "sdxl", seed=12)
    link(models["vae"], root / "webui/models/VAE/vae.safetensors")
    link(models["emb_sd1"], root / "webui/embeddings/negative.safetensors")
    comfy = root / "comfy/models"
    link(models["sdxl"], comfy / "checkpoints/sdxl.safetensors")
    link(models["sdxl_unet"], comfy / "checkpoints/sdxl-unet-here.safetensors")
    link(lora / "SD1.5/xl-detail.safetensors", comfy / "loras/sdxl-detail.safetensors")
    (comfy / "diffusion_models").mkdir()
    return root


def _preview(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 12), (200, 80, 40)).save(path)
