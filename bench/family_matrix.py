"""Every command on every transformer family, through the console script.

Per family (Flux.1, Chroma, Flux.2, SD3.5, Qwen-Image, Wan, Z-Image) two
small seeded bf16 transformers with the real key names (original layout;
Qwen-Image's own diffusers names), then each command on them: inspect, hash,
a per-block merge, prune, ema (refused: no EMA weights, exit 2), quantize
(ComfyUI fp8), export-gguf (q8_0), convert to the diffusers layout and back
(Qwen-Image: refused, one layout), verify --probe against the input, and
lora extract / info / bake / resize / merge / convert. Prints one line per
command (exit code, the expected one, seconds, the error line of a refusal)
and exits 1 when a command ends otherwise than expected or prints a
traceback. The suite tests each of these with hand-computed numbers; this
is the end-to-end matrix the issue's closing note cites.

Run: ``.venv/bin/python bench/family_matrix.py [--family NAME ...] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def small_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    """family -> small original-layout transformer keys (real names)."""
    from modelkit.arch import chroma, flux, flux2, qwen_image, sd3, wan, z_image

    zk = z_image.transformer_keys(z_image.small(z_image.VARIANTS["z-image"]))
    # the one full-size tensor Z-Image's detection reads (tells it from Lumina 2)
    zk.update({"cap_embedder.0.weight": (2560,), "cap_embedder.1.weight": (3840, 2560)})
    return {
        "flux": flux.transformer_keys(replace(flux.small(flux.VARIANTS["dev"]),
                                              hidden_size=128, num_heads=1)),
        "chroma": chroma.transformer_keys(replace(chroma.small(chroma.VARIANTS["chroma"]),
                                                  hidden_size=128, num_heads=1)),
        "flux2": flux2.transformer_keys(replace(flux2.small(flux2.VARIANTS["dev"]),
                                                hidden_size=128, num_heads=1)),
        "sd3": sd3.transformer_keys(replace(sd3.VARIANTS["sd3.5-medium"], depth=2,
                                            pos_embed_max=4, attn2_layers=1)),
        "qwen_image": qwen_image.transformer_keys(
            replace(qwen_image.small(qwen_image.VARIANTS["qwen-image"]), num_heads=1)),
        "wan": wan.transformer_keys(wan.small(wan.VARIANTS["t2v-1.3b"])),
        "z_image": zk,
    }


def flux_aio_keys() -> dict[str, tuple[int, ...]]:
    """A small Flux.1 all-in-one: transformer, VAE, CLIP-L and T5 (ComfyUI's names)."""
    from modelkit.arch import flux

    cfg = replace(flux.small(flux.VARIANTS["dev"]), hidden_size=128, num_heads=1)
    return flux.all_in_one_keys(cfg, tiny=True)


def write(path: Path, keys: dict[str, tuple[int, ...]], seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(s, generator=gen).mul_(0.05).to(torch.bfloat16)
               for k, s in keys.items()}, str(path))
    return path


def commands(fam: str, d: Path) -> list[tuple[str, list[str], int]]:
    """(label, argv, expected exit code) for one family's files in ``d``."""
    a, b, lo = str(d / f"{fam}_a.safetensors"), str(d / f"{fam}_b.safetensors"), str(
        d / f"{fam}_lora.safetensors")
    o = lambda name: str(d / f"{fam}_{name}")  # noqa: E731
    two_layouts = fam != "qwen_image"
    out = [
        ("inspect", ["inspect", a, "--json"], 0),
        ("hash", ["hash", a], 0),
        ("merge", ["merge", a, b, "-o", o("merge.safetensors"), "--blocks",
                   "IN=0.1,default=0.3"], 0),
        ("prune", ["prune", a, "-o", o("prune.safetensors")], 0),
        ("ema", ["ema", a, "-o", o("ema.safetensors")], 2),
        ("quantize", ["quantize", a, "-o", o("fp8.safetensors"), "--dtype", "fp8_e4m3fn",
                      "--format", "comfy"], 0),
        ("export-gguf", ["export-gguf", a, "-o", o("q8.gguf"), "--type", "q8_0"], 0),
        ("convert", ["convert", a, "-o", o("diff.safetensors"), "--layout", "diffusers"],
         0 if two_layouts else 2),
        # the small Z-Image keeps the full-size caption embedder its detection
        # reads, so its blocks do not fit together: refused in one line
        ("verify --probe", ["verify", o("prune.safetensors"), "--probe", "--reference", a],
         2 if fam == "z_image" else 0),
        ("lora extract", ["lora", "extract", a, b, "-o", lo, "--rank", "4"], 0),
        ("lora info", ["lora", "info", lo], 0),
        ("lora bake", ["lora", "bake", a, lo, "-o", o("baked.safetensors")], 0),
        ("lora resize", ["lora", "resize", lo, "--rank", "2", "-o", o("r2.safetensors")], 0),
        ("lora merge", ["lora", "merge", f"{lo}:0.5", f"{lo}:0.5", "--rank", "4", "-o",
                        o("lm.safetensors")], 0),
        ("lora convert", ["lora", "convert", lo, "--to", "peft", "-o", o("peft.safetensors")],
         0),
    ]
    if fam == "flux":  # the all-in-one file's components out and back in
        aio, vae = str(d / "flux_aio.safetensors"), o("vae.safetensors")
        out += [("extract", ["extract", aio, "--component", "vae", "-o", vae], 0),
                ("swap", ["swap", aio, "--vae", vae, "-o", o("swapped.safetensors")], 0)]
    if two_layouts:
        out.append(("convert back", ["convert", o("diff.safetensors"), "-o",
                                     o("orig.safetensors"), "--layout", "original"], 0))
    return out


def run(argv: list[str]) -> tuple[int, float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "modelkit", *argv, *(
        ["-q"] if argv[0] not in ("inspect", "hash", "lora", "library") else [])],
        capture_output=True, text=True, env=env, check=False)
    return p.returncode, time.perf_counter() - t0, p.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="write the files here and keep them")
    ap.add_argument("--family", action="append", help="only these families")
    args = ap.parse_args()
    d = args.keep or Path(tempfile.mkdtemp(prefix="modelkit-matrix-"))
    d.mkdir(parents=True, exist_ok=True)
    fams = small_keys()
    bad = 0
    rows: list[tuple[str, str, int, int, float, str]] = []
    for fam, keys in fams.items():
        if args.family and fam not in args.family:
            continue
        write(d / f"{fam}_a.safetensors", keys, 1)
        write(d / f"{fam}_b.safetensors", keys, 2)
        if fam == "flux":
            write(d / "flux_aio.safetensors", flux_aio_keys(), 3)
        for label, argv, want in commands(fam, d):
            rc, sec, err = run(argv)
            tb = "Traceback" in err
            ok = rc == want and not tb
            bad += not ok
            first = next((ln for ln in err.splitlines() if ln.strip()), "") if rc else ""
            rows.append((fam, label, rc, want, sec, first[:110]))
            print(f"{fam:10} {label:14} rc={rc} (want {want}) {sec:5.1f}s "
                  f"{'OK' if ok else 'FAIL'} {first[:110] if not ok or rc else ''}",
                  flush=True)
    print(json.dumps({"failed": bad, "rows": len(rows)}))
    if args.keep is None:
        shutil.rmtree(d, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
