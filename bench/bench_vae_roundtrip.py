"""The VAE round trip (modelkit/verify/vae_roundtrip.py): its own forward
pass against diffusers' ``AutoencoderKL`` on the same weights, and timings.

For a tiny SD VAE (4 latent channels, with quant convs), the tiny Flux ``ae``
(16, without) and, with ``--full``, full-width ones (SD's 128-channel VAE at
256x256; slow on 2 cores), it builds diffusers' model from the file's keys
(diffusers' own LDM names -> diffusers names, modelkit.arch.diffusers_names),
reconstructs the test picture both ways and prints the largest difference
and the PSNR of each, and the time of each pass.

    .venv/bin/python bench/bench_vae_roundtrip.py [--dir /dev/shm/modelkit-bench] [--full]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelkit import testing as t
from modelkit.io.open import open_source
from modelkit.verify import vae_roundtrip as vr


def diffusers_vae(source: object, layout: vr.VaeLayout) -> torch.nn.Module:
    """diffusers' AutoencoderKL loaded (strictly) with the file's VAE."""
    from diffusers import AutoencoderKL

    from modelkit.arch.diffusers_names import _vae_module, norm_groups

    n = len(layout.channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=layout.channels,
        layers_per_block=layout.layers, latent_channels=layout.latent,
        norm_num_groups=norm_groups(list(layout.channels)),
        use_quant_conv=layout.quant_conv, use_post_quant_conv=layout.quant_conv)
    state = {}
    for key in (k for k in source.infos if k.startswith(layout.prefix)):  # type: ignore[attr-defined]
        rest = key[len(layout.prefix):]
        if not rest.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            continue
        module, leaf = rest.rsplit(".", 1)
        target, is_attn = _vae_module(module, n)
        w = source.get(key).float()  # type: ignore[attr-defined]
        if is_attn and leaf == "weight" and w.dim() == 4:
            w = w.reshape(w.shape[0], w.shape[1])
        state[f"{target}.{leaf}"] = w
    vae.load_state_dict(state, strict=True)
    return vae.eval()


def compare(name: str, path: Path) -> None:
    src = open_source(path)
    layout = vr.find_vae(src)
    assert layout is not None, name
    picture = vr.test_picture(vr.SIZES[layout.tiny])
    start = time.perf_counter()
    mine = vr.reconstruct(src, layout, picture)
    t_mine = time.perf_counter() - start
    vae = diffusers_vae(src, layout)
    start = time.perf_counter()
    with torch.inference_mode():
        theirs = vae.decode(vae.encode(picture).latent_dist.mode()).sample
    t_theirs = time.perf_counter() - start
    print(f"| {name} | {layout.family} | {picture.shape[-1]} | "
          f"{float((mine - theirs).abs().max()):.3g} | {vr.psnr(mine, picture):.2f} | "
          f"{vr.psnr(theirs, picture):.2f} | {t_mine:.3f} | {t_theirs:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--full", action="store_true", help="also the full-width SD VAE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = {"tiny SD VAE": Path(tmp) / "vae.safetensors",
                 "tiny Flux ae": Path(tmp) / "flux.safetensors"}
        t.write_vae(files["tiny SD VAE"], dtype="F32", seed=3)
        t.write_flux(files["tiny Flux ae"], all_in_one=True, dtype="F32", seed=3)
        if args.full:
            files["SD VAE (full width)"] = Path(tmp) / "vae-full.safetensors"
            t.write_vae(files["SD VAE (full width)"], tiny=False, dtype="F32", seed=3)
        print("| VAE | family | px | max abs diff | PSNR modelkit | PSNR diffusers | "
              "s modelkit | s diffusers |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, path in files.items():
            compare(name, path)


if __name__ == "__main__":
    main()
