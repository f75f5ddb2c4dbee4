"""``quantize --format comfy`` / ``comfy-legacy``: files read back by
ComfyUI's loading rules, written here independently of modelkit from
Comfy-Org/ComfyUI ``comfy/utils.py`` (``convert_old_quants``),
``comfy/ops.py`` (``mixed_precision_ops``: a Linear pops ``weight``,
``weight_scale`` and ``comfy_quant``) and ``comfy/quant_ops.py``
(``QUANT_ALGOS``; int8_blockwise as Comfy-Org/ComfyUI pull request #10864's
``BlockWiseINT8Layout``): the scales are checked bit for bit against the
layouts' formulas, the dequantized weights by SNR per layer, kept layers
byte for byte, the metadata for paths, the CLI errors through the console
script."""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path

import pytest
import torch
from cli_support import run_all
from conftest import run_chain
from safetensors import safe_open

from modelkit import testing as t
from modelkit.arch import registry
from modelkit.arch.configs import UNET_PREFIX
from modelkit.arch.keys import checkpoint_keys, unet_keys
from modelkit.convert import comfy_quant as cq
from modelkit.errors import ModelkitError

# comfy/quant_ops.py QUANT_ALGOS: format -> storage dtype (and the int8
# blockwise layout of pull request #10864, group_size 128)
STORAGE = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
           "int8_blockwise": torch.int8}
SNR_MIN_DB = 25.0


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})


def convert_old_quants(sd: dict[str, torch.Tensor], prefix: str, metadata: dict[str, str]
                       ) -> dict[str, torch.Tensor]:
    """comfy/utils.py convert_old_quants: metadata layers, or the legacy
    scaled_fp8 marker, become per-layer comfy_quant uint8 JSON tensors."""
    quant = None
    if "_quantization_metadata" not in metadata:
        marker = prefix + "scaled_fp8"
        if marker in sd:
            full_mm = sd.pop(marker).numel() == 2
            out, layers = {}, {}
            for k, w in sd.items():
                if k.startswith(prefix) and k.endswith(".scale_weight"):
                    layer = k[:-len(".scale_weight")]
                    k = layer + ".weight_scale"
                    layers[layer] = {"format": "float8_e4m3fn"}
                    if full_mm:
                        layers[layer]["full_precision_matrix_mult"] = True
                out[k] = w
            sd, quant = out, {"layers": layers}
    else:
        quant = json.loads(metadata["_quantization_metadata"])
    for layer, conf in (quant or {}).get("layers", {}).items():
        sd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()),
                                                  dtype=torch.uint8)
    return sd


def comfy_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """What ComfyUI's mixed-precision Linear layers load: (every tensor, the
    quantized layers' weights dequantized in float32; layer -> its conf)."""
    sd, metadata = _read(path)
    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in sd) else ""
    sd = convert_old_quants(sd, prefix, metadata)
    confs = {}
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        layer = key[:-len(".comfy_quant")]
        conf = json.loads(sd.pop(key).numpy().tobytes())
        weight = sd.pop(layer + ".weight").to(STORAGE[conf["format"]])
        scale = sd.pop(layer + ".weight_scale")
        assert weight.ndim == 2 and scale.dtype == torch.float32, layer  # Linear (out, in)
        if conf["format"] == "int8_blockwise":
            g = conf.get("group_size", 128)
            m, n = weight.shape
            assert scale.shape == (m // g, n // g)
            blocks = weight.reshape(m // g, g, n // g, g).permute(0, 2, 1, 3).float()
            w = (blocks * scale[:, :, None, None]).permute(0, 2, 1, 3).reshape(m, n)
        else:
            assert scale.shape == ()  # float32 scalar (QUANTIZATION.md)
            w = weight.float() * scale
        sd[layer + ".weight"] = w
        confs[layer] = conf
    # nothing ComfyUI would load unscaled: no 8-bit weight without its comfy_quant
    assert not [k for k, v in sd.items() if v.dtype in STORAGE.values() and v.numel()]
    assert not [k for k in sd if k.endswith((".weight_scale", ".scale_weight"))]
    return sd, confs


def _snr(restored: torch.Tensor, original: torch.Tensor) -> float:
    x = original.double()
    return float(10 * torch.log10((x * x).sum() / ((restored.double() - x) ** 2).sum()))


def _heavy(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Student-t (3 degrees of freedom) weights: outliers set the scale."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    return (0.02 * normal / (chi2 / 3).sqrt()).half()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("comfyq")
    gauss = d / "gauss.safetensors"
    t.write_checkpoint(gauss, "sd1", seed=31)
    keys = checkpoint_keys(t.arch_spec("sd1"))
    heavy_w = {k: _heavy(s, i) for i, (k, s) in enumerate(keys.items())
               if k.startswith(UNET_PREFIX) and k.endswith(".weight") and len(s) == 2}
    heavy = d / "heavy.safetensors"
    t.write_tensors(heavy, keys, seed=32, overrides=heavy_w)
    # a UNet-only file with two Linear layers of whole 128x128 blocks
    ukeys = dict(unet_keys(t.arch_spec("sd1").unet))
    ff = "input_blocks.7.1.transformer_blocks.0.ff."
    g = torch.Generator().manual_seed(7)
    laplace = torch.empty(256, 128).exponential_(generator=g) * torch.randn(256, 128,
                                                                            generator=g).sign()
    big = {ff + "net.0.proj.weight": (0.02 * laplace).half(),
           ff + "net.2.weight": (torch.randn(128, 384, generator=g) * 0.03).half()}
    ukeys.update({k: tuple(v.shape) for k, v in big.items()})
    unet = d / "unet.safetensors"
    t.write_tensors(unet, ukeys, seed=33, overrides=big)
    return {"gauss": gauss, "heavy": heavy, "unet": unet}


def _quantize(src: Path, out: Path, dtype: str, fmt: str) -> object:
    (step,), _ = run_chain([src], [("quantize", {"dtype": dtype, "format": fmt})], out)
    return step.report


@pytest.mark.parametrize("which,fmt", [("gauss", "comfy"), ("heavy", "comfy-legacy")])
def test_fp8_reads_back_by_comfyui_rules(models: dict[str, Path], tmp_path: Path, fmt: str,
                                         which: str) -> None:
    src = models[which]
    out = tmp_path / f"{which}-{fmt}.safetensors"
    report = _quantize(src, out, "fp8_e4m3fn", fmt)
    loaded, confs = comfy_load(out)
    original, _ = _read(src)
    arch = registry.get("sd1")
    expected = {k[:-len(".weight")] for k, v in original.items()
                if k.startswith(UNET_PREFIX)
                and cq.keep_reason(k, tuple(v.shape), "F8_E4M3", arch.quant_keep) is None}
    assert set(confs) == expected and len(expected) >= 40
    assert all(c == {"format": "float8_e4m3fn"} for c in confs.values())
    stored, meta = _read(out)
    measured = {e.key: e for e in report.errors}
    for layer in confs:
        w = original[layer + ".weight"].float()
        scale_key = layer + (".weight_scale" if fmt == "comfy" else ".scale_weight")
        scale = stored[scale_key]
        # TensorCoreFP8Layout: amax / 448 in float32, weight * (1 / scale) rounded
        assert scale.item() == (w.abs().amax() / 448.0).item()
        q = (w * (1.0 / scale)).to(torch.float8_e4m3fn)
        assert torch.equal(stored[layer + ".weight"].view(torch.uint8), q.view(torch.uint8))
        snr = _snr(loaded[layer + ".weight"], w)
        assert snr >= SNR_MIN_DB, layer
        assert measured[layer + ".weight"].snr_db == pytest.approx(snr, abs=1e-3)
    # kept layers, biases, norms, text encoder and VAE: the input's bytes
    kept = [k for k in original if not k.endswith(".weight") or k[:-7] not in confs]
    assert len(kept) > 900
    for k in kept:
        assert torch.equal(loaded[k].view(torch.uint8), original[k].view(torch.uint8)), k
    assert set(loaded) == set(original)
    if fmt == "comfy":
        assert json.loads(meta[cq.METADATA_KEY])["format_version"] == "1.0"
    else:
        assert stored[UNET_PREFIX + "scaled_fp8"].dtype == torch.float8_e4m3fn
        assert cq.METADATA_KEY not in meta


def test_int8_blockwise_reads_back_by_comfyui_rules(models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "int8.safetensors"
    report = _quantize(models["unet"], out, "int8", "comfy")
    loaded, confs = comfy_load(out)
    original, _ = _read(models["unet"])
    stored, meta = _read(out)
    ff = "input_blocks.7.1.transformer_blocks.0.ff."
    assert set(confs) == {ff + "net.0.proj", ff + "net.2"}  # the only whole-block layers
    assert json.loads(meta[cq.METADATA_KEY])["layers"][ff + "net.2"] == {
        "format": "int8_blockwise", "group_size": 128}
    for layer in confs:
        w = original[layer + ".weight"].float()
        m, n = w.shape
        blocks = w.reshape(m // 128, 128, n // 128, 128).permute(0, 2, 1, 3)
        scale = blocks.abs().amax(dim=(2, 3)) / 127.0
        assert torch.equal(stored[layer + ".weight_scale"], scale)
        q = (blocks / scale[:, :, None, None]).round().clamp(-127, 127)
        assert torch.equal(stored[layer + ".weight"].float(),
                           q.permute(0, 2, 1, 3).reshape(m, n))
        # Laplace weights (heavy-tailed) and Gaussian ones; Student-t(3) blocks,
        # whose outliers set each block's step, measured 24.6 dB: the format's
        # limit (the bytes above are its formula exactly)
        floor = SNR_MIN_DB if layer.endswith("net.0.proj") else 35.0
        assert _snr(loaded[layer + ".weight"], w) >= floor, layer
    assert report.kept["not a multiple of 128x128 blocks"] > 0
    for k in set(original) - {c + ".weight" for c in confs}:
        assert torch.equal(loaded[k].view(torch.uint8), original[k].view(torch.uint8)), k


def test_metadata_names_no_folder_user_or_host(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "meta.safetensors"
    _quantize(models["gauss"], out, "fp8_e4m3fn", "comfy")
    _, meta = _read(out)
    text = json.dumps(meta)
    for private in {str(tmp_path), str(models["gauss"].parent), str(Path.home()),
                    getpass.getuser(), socket.gethostname()}:
        assert private not in text
    assert "gauss.safetensors" in text  # the recipe names the input by file name


def test_keep_lists_follow_the_registry() -> None:
    flux = registry.get("flux").quant_keep
    reason = cq.keep_reason
    assert reason("img_in.weight", (3072, 64 * 64), "F8_E4M3", flux) is not None
    assert reason("final_layer.linear.weight", (64, 3072), "F8_E4M3", flux) is not None
    assert reason("double_blocks.0.img_attn.qkv.weight", (9216, 3072), "F8_E4M3", flux) is None
    assert reason("double_blocks.0.img_attn.norm.key_norm.scale", (128,), "F8_E4M3",
                  flux) is not None
    wan = registry.get("wan").quant_keep
    assert reason("blocks.0.self_attn.q.weight", (5120, 5120), "I8", wan) is None
    assert reason("text_embedding.0.weight", (5120, 4096), "I8", wan) is not None
    assert reason("blocks.0.ffn.0.weight", (13824, 5120), "I8", wan) is None
    assert reason("blocks.0.ffn.0.weight", (13824, 5100), "I8", wan) is not None
    sd1 = registry.get("sd1").quant_keep
    assert reason(UNET_PREFIX + "time_embed.0.weight", (1280, 320), "F8_E4M3", sd1)
    assert reason(UNET_PREFIX + "input_blocks.1.1.proj_in.weight", (320, 320, 1, 1),
                  "F8_E4M3", sd1)  # a conv: ComfyUI would use it unscaled
    assert all(a.quant_keep for a in registry.REGISTRY.values())


def test_fp8_decode_table_is_torch_cast() -> None:
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        codes = torch.arange(256, dtype=torch.uint8).view(dtype)
        table, ref = cq.decode_table(dtype), codes.float()
        same = (table == ref) | (table.isnan() & ref.isnan())
        assert bool(same.all())


def test_refusals_name_the_file_and_what_to_do(models: dict[str, Path], tmp_path: Path) -> None:
    done = tmp_path / "done.safetensors"
    _quantize(models["gauss"], done, "fp8_e4m3fn", "comfy")
    cases = {"already quantized": (done, "fp8_e4m3fn", "comfy"),
             "16- and 32-bit": (models["gauss"], "fp16", "comfy"),
             "fp8_e4m3fn only": (models["unet"], "fp8_e5m2", "comfy-legacy")}
    for words, (src, dtype, fmt) in cases.items():
        with pytest.raises(ModelkitError, match=words) as info:
            _quantize(src, tmp_path / "x.safetensors", dtype, fmt)
        assert src.name in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_dequantize_applies_comfyuis_scales(models: dict[str, Path], tmp_path: Path) -> None:
    """modelkit reads a ComfyUI scaled file dequantized (modelkit.io.quantized),
    so ``dequantize`` writes what ComfyUI computes, rounded once to fp16."""
    done = tmp_path / "done.safetensors"
    _quantize(models["gauss"], done, "fp8_e4m3fn", "comfy")
    out = tmp_path / "x.safetensors"
    run_chain([done], [("dequantize", {"dtype": "fp16"})], out)
    expected, confs = comfy_load(done)
    got, _ = _read(out)
    assert confs and set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value.to(torch.float16)), key


def test_cli_int8_legacy_is_exit_2_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    (code, out, err), = run_all({"q": ["quantize", str(models["gauss"]), "-o", "a.safetensors",
                                       "--dtype", "int8", "--format", "comfy-legacy"]},
                                tmp_path).values()
    assert (code, out) == (2, "") and len(err.strip().splitlines()) == 1, err
    assert "fp8_e4m3fn only" in err and "gauss.safetensors" in err
    assert list(tmp_path.iterdir()) == []


def test_fp8_rounding_saturates_counts_and_measures_exactly() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, generator=g) * 100.0  # about 1 in 300 beyond 448
    x[:3] = torch.tensor([1000.0, -5000.0, 448.0])
    out = torch.empty(3000, dtype=torch.float8_e4m3fn)
    err, ref, count = cq.fp8_buffers(torch.float8_e4m3fn).round(x, out, None, 1.0, 448.0)
    expected = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    assert count == int((x.abs() > 448).sum()) >= 2
    d = out.double() - x.double()
    assert err == pytest.approx(float((d * d).sum()), rel=1e-5)
    assert ref == pytest.approx(float((x.double() ** 2).sum()), rel=1e-5)


def test_flux_scaled_fp8_keeps_its_declared_layers(tmp_path: Path) -> None:
    """A transformer family quantizes by its registry entry: Flux.1's Linear
    weights scaled (SNR >= 25 dB read back by ComfyUI's rules), its
    embedders and final layer (``quant_keep``) and 1-D tensors untouched;
    modelkit reads the file back dequantized."""
    from modelkit.io.open import open_source

    src = tmp_path / "flux.safetensors"
    t.write_flux(src, hidden=256, depth=1, single=1, seed=3)
    out = tmp_path / "flux-fp8.safetensors"
    _quantize(src, out, "fp8_e4m3fn", "comfy")
    original, _ = _read(src)
    restored, confs = comfy_load(out)
    keep = registry.REGISTRY["flux"].quant_keep
    assert confs and all(not k.startswith(keep) for k in confs)
    for key, value in original.items():
        layer = key.removesuffix(".weight")
        if layer in confs:
            assert _snr(restored[key], value.float()) >= 25, key
        else:
            assert torch.equal(restored[key], value), key
    reread = open_source(out)
    assert set(reread.infos) == set(original)
    key = next(iter(confs)) + ".weight"
    assert torch.equal(reread.get(key), restored[key])


def test_verify_renders_a_comfy_file_from_its_dequantized_weights(
        models: dict[str, Path], tmp_path: Path) -> None:
    """diffusers would load the stored fp8 codes without their scales: verify
    renders what modelkit dequantizes, and its static checks see the float
    model (no scale or comfy_quant tensor among the keys)."""
    from modelkit.verify.models import open_model_under_test

    out = tmp_path / "c.safetensors"
    _quantize(models["gauss"], out, "fp8_e4m3fn", "comfy")
    model = open_model_under_test(out)
    assert model.render_source is not model.stored and not model.is_plain_file
    assert any("dequantized" in n for n in model.notes)
    assert not [k for k in model.stored.infos if k.endswith((".weight_scale", ".comfy_quant"))]
    expected, confs = comfy_load(out)
    for key in (f"{layer}.weight" for layer in list(confs)[:5]):
        assert torch.equal(model.stored.get(key), expected[key]), key
