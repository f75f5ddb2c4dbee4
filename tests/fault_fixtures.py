"""Clean tiny SD1, SDXL and Flux.1 files and the same files with the
faults ``modelkit verify`` must catch (issue 21), for
tests/test_verify_faults.py and bench/bench_verify_faults.py.

Per family: the clean fp32 source (``ref``) and its fp16 cast (``cast``);
``loose``: every reference-free fault (a dropped key, a zeroed tensor, a
NaN tensor, a weight beyond the fp16 range cast to fp16); ``broken``,
against the expected LoRA bake (``expected``): the LoRA baked at twice its
scale, a transposed square weight, q and k swapped, a zeroed VAE encoder
layer, cast to fp16; ``wrong_scale``: a quantized file (modelkit int8 for
SD, ComfyUI scaled fp8 for Flux) with one layer's scale doubled. Each fault
sits in its own layer, so each is told apart by the layer its check names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("sd1", "sdxl", "flux")
UNET = "model.diffusion_model."
VAE = {"sd1": "first_stage_model.", "sdxl": "first_stage_model.", "flux": "vae."}
# a square self-attention weight and its q/k partners
ATTN = {"sd1": UNET + "input_blocks.1.1.transformer_blocks.0.attn1.",
        "sdxl": UNET + "input_blocks.4.1.transformer_blocks.0.attn1."}
FLUX_QKV = UNET + "double_blocks.0.img_attn.qkv.weight"
FLUX_SQUARE = UNET + "double_blocks.0.img_attn.proj.weight"
OVERFLOW = 1e5  # beyond fp16's largest finite 65504
VOCAB = 1000


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def _save(sd: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None
          ) -> Path:
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata=meta or None)
    return path


def _f16(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


def _lora_delta(w: torch.Tensor, seed: int) -> torch.Tensor:
    """A rank-4 update of about 5 % of the weight's norm."""
    gen = torch.Generator().manual_seed(seed)
    up = torch.randn(w.shape[0], 4, generator=gen)
    down = torch.randn(4, w.shape[1], generator=gen)
    d = up @ down
    return d * (0.05 * float(w.float().norm()) / float(d.norm()))


def _fp8_scaled(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's (legacy) scaled fp8: the ``scaled_fp8`` marker, 2-D
    transformer weights as e4m3fn with a per-tensor ``.scale_weight``
    (amax / 448) beside them."""
    out = {**sd, UNET + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, w in sd.items():
        if key.startswith(UNET) and key.endswith(".weight") and w.dim() == 2:
            s = w.abs().max() / 448.0
            out[key] = (w / s).to(torch.float8_e4m3fn)
            out[key.removesuffix(".weight") + ".scale_weight"] = s.reshape(()).float()
    return out


def _int8(src: Path, out: Path) -> Path:
    from conftest import run_chain

    run_chain([src], [("quantize", {"dtype": "int8"})], out)
    return out


def _clean(fam: str, path: Path) -> Path:
    """The clean fp32 checkpoint: the tiny fixture's keys with a 1,000-token
    vocabulary (the CLIP token tables are most of a tiny file's bytes;
    verify reads the vocabulary from the file)."""
    from modelkit import testing as t
    from modelkit.arch import flux
    from modelkit.arch.keys import checkpoint_keys

    if fam == "flux":
        keys = flux.all_in_one_keys(t.flux_config("dev"), tiny=True)
    else:
        keys = checkpoint_keys(t.arch_spec(fam))
    small = {k: (VOCAB, s[1]) if k.endswith("token_embedding.weight") else s
             for k, s in keys.items()}
    t.write_tensors(path, small, dtype="F32", seed=4)
    return path


def _pick(fam: str) -> dict[str, Any]:
    """The layers each fault goes into (different layers, so each fault is
    told apart by the layer its check names)."""
    if fam == "flux":
        return {"square": FLUX_SQUARE, "qkv": FLUX_QKV,
                "lora": [UNET + "double_blocks.1.img_attn.proj.weight",
                         UNET + "single_blocks.0.linear2.weight"],
                "drop": UNET + "single_blocks.1.linear2.weight",
                "zero": UNET + "double_blocks.1.txt_mlp.0.weight",
                "nan": UNET + "double_blocks.1.txt_mlp.2.weight",
                "inf": UNET + "single_blocks.1.linear1.weight"}
    attn, cross = ATTN[fam], ATTN[fam].replace("attn1", "attn2")
    return {"square": attn + "to_out.0.weight", "q": attn + "to_q.weight",
            "k": attn + "to_k.weight", "lora": [cross + "to_q.weight", cross + "to_out.0.weight"],
            "drop": UNET + "output_blocks.1.0.in_layers.2.weight",
            "zero": UNET + "output_blocks.2.0.in_layers.2.weight",
            "nan": UNET + "output_blocks.2.0.out_layers.3.weight",
            "inf": UNET + "input_blocks.1.0.in_layers.2.weight"}


def _loose(sd: dict[str, torch.Tensor], at: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A dropped key, a zeroed and a NaN tensor, a weight beyond fp16's range;
    cast to fp16."""
    loose = {k: v for k, v in sd.items() if k != at["drop"]}
    loose[at["zero"]] = torch.zeros_like(sd[at["zero"]])
    loose[at["nan"]] = torch.full_like(sd[at["nan"]], math.nan)
    big = sd[at["inf"]].clone()
    big.view(-1)[0] = OVERFLOW  # 1e5 in fp16: inf
    loose[at["inf"]] = big
    return _f16(loose)


def _broken(fam: str, sd: dict[str, torch.Tensor], at: dict[str, Any]) -> dict[str, Any]:
    """The expected LoRA bake, and its fp16 cast with the LoRA at 2x, a
    transposed weight, q and k swapped and a zeroed VAE encoder layer."""
    deltas = {k: _lora_delta(sd[k], i) for i, k in enumerate(at["lora"])}
    expected = {**sd, **{k: sd[k] + dl for k, dl in deltas.items()}}
    bad = {**expected, **{k: sd[k] + 2 * dl for k, dl in deltas.items()}}
    sq = at["square"]
    bad[sq] = sd[sq].t().contiguous()
    if fam == "flux":
        qkv = sd[FLUX_QKV]
        h = qkv.shape[0] // 3
        bad[FLUX_QKV] = torch.cat([qkv[h:2 * h], qkv[:h], qkv[2 * h:]])
    else:
        bad[at["q"]], bad[at["k"]] = sd[at["k"]], sd[at["q"]]
    vae_layer = VAE[fam] + "encoder.down.1.block.0.conv1.weight"
    bad[vae_layer] = torch.zeros_like(sd[vae_layer])
    return {"expected": expected, "bad": bad, "deltas": deltas, "vae_layer": vae_layer}


def _wrong_scale(fam: str, ref: Path, sd: dict[str, torch.Tensor], at: dict[str, Any],
                 out: Path) -> str:
    """A quantized file (ComfyUI scaled fp8 for Flux, modelkit int8 for SD)
    with one layer's scale doubled; that layer's name."""
    meta = None
    if fam == "flux":
        quant = _fp8_scaled(sd)
        scaled = at["square"]
        scale_key = scaled.removesuffix(".weight") + ".scale_weight"
    else:  # the first UNet weight big enough for int8 (4096+ elements)
        quant, meta = _load(_int8(ref, out.with_name("quant.safetensors")))
        scale_key = next(k for k in quant if k.startswith(UNET) and k.endswith("_scale"))
        scaled = scale_key.removesuffix("_scale")
    _save({**quant, scale_key: quant[scale_key] * 2}, out, meta)
    return scaled


def build(fam: str, d: Path, cases: tuple[str, ...] = ("clean", "loose", "broken",
                                                         "wrong_scale")) -> dict[str, Any]:
    """One family's files for ``cases``: the clean source (``ref``) and its
    fp16 cast (``cast``); ``loose``; ``expected`` and ``broken``;
    ``wrong_scale``. Also the tensors and the faulted layers' names."""
    ref = _clean(fam, d / "ref.safetensors")
    sd, _ = _load(ref)
    at = _pick(fam)
    out: dict[str, Any] = {"sd": sd, "at": at}
    files = out["files"] = {"ref": ref}
    if "clean" in cases:
        files["cast"] = _save(_f16(sd), d / "cast.safetensors")
    if "loose" in cases:
        files["loose"] = _save(_loose(sd, at), d / "loose.safetensors")
    if "broken" in cases:
        out.update(_broken(fam, sd, at))
        files["expected"] = _save(out["expected"], d / "expected.safetensors")
        files["broken"] = _save(_f16(out["bad"]), d / "broken.safetensors")
    if "wrong_scale" in cases:
        files["wrong_scale"] = d / "wrong_scale.safetensors"
        out["scaled"] = _wrong_scale(fam, ref, sd, at, files["wrong_scale"])
    return out


CASES = ("clean", "loose", "broken", "wrong_scale")
COMMON = ("--static-only", "--threads", "1", "--json", "-q")


def verify_args(b: dict[str, Any], case: str) -> list[str]:
    """``modelkit verify`` arguments of one case."""
    f = {k: str(v) for k, v in b["files"].items()}
    model, reference = {"clean": ("cast", "ref"), "loose": ("loose", None),
                        "broken": ("broken", "expected"),
                        "wrong_scale": ("wrong_scale", "ref")}[case]
    ref = ["--reference", f[reference]] if reference else []
    return ["verify", f[model], *ref, *COMMON]
