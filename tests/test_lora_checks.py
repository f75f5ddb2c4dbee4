"""Issue 17 items 16, 17, 22 and the LoRA parts of 4 and 8: malformed or
non-finite adapters end in one line naming the module and exit 2 (never a
traceback, exit 3 or a NaN file), convert says which loaders read its
output, DoRA's strength rule is pinned, LoRA block presets and extract of
a model against itself are refused.

The command-line cases are message checks: they run in this process
through ``modelkit.cli.main`` (the console script's function, which gives
its exit code; tests/test_cli_exit_codes.py runs the console script itself),
so no child pays a second torch import; every malformed adapter holds the
one module it breaks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_support import run_here as _console
from conftest import keep_lora_modules
from safetensors.torch import load_file, save_file

from modelkit.errors import ModelkitError
from modelkit.io.header import read_header
from modelkit.io.reader import open_model
from modelkit.lora import bake
from modelkit.testing import write_checkpoint
from modelkit.testing.lora import write_lora

LIN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
LIN_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
NAN, INF = float("nan"), float("inf")


def _set(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda t: t.__setitem__(f"{LIN}.{key}", value)


def _fill(key: str, value: float) -> Callable[[dict], None]:
    return lambda t: t[f"{LIN}.{key}"].fill_(value)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda t: t.pop(f"{LIN}.{key}")


def _lokr_zero(t: dict) -> None:
    t[f"{LIN}.lokr_w1"] = torch.zeros(0, 4)


def _rank0(t: dict) -> None:
    t[f"{LIN}.lora_down.weight"] = torch.zeros(0, 32)
    t[f"{LIN}.lora_up.weight"] = torch.zeros(32, 0)


def _scaled(factor: float) -> Callable[[dict], None]:
    def change(t: dict) -> None:
        for half in ("lora_up.weight", "lora_down.weight"):
            t[f"{LIN}.{half}"] = t[f"{LIN}.{half}"] * factor
    return change


BAKE, INFO, RESIZE, CONVERT = "bake", "info", "resize", "convert"
ALL = (BAKE, INFO, RESIZE, CONVERT)
# name -> (fixture kind, dora, change, commands that must refuse it, words in the message)
CASES: dict[str, tuple[str, bool, Callable[[dict], None], tuple[str, ...], str]] = {
    # item 17: shapes, from the header
    "rank0": ("lora", False, _rank0, ALL, "zero size, rank 0"),
    "scalar_down": ("lora", False, _set("lora_down.weight", torch.tensor(1.0)), ALL,
                    "lora_down.weight has shape []"),
    "loha_no_w2b": ("loha", False, _drop("hada_w2_b"), ALL, "lacks hada_w2_b"),
    "up3_down4": ("lora", False, _set("lora_up.weight", torch.ones(32, 3)), ALL,
                  "has rank 3 but lora_down.weight [4, 32] has rank 4"),
    "lokr_zero": ("lokr", False, _lokr_zero, ALL, "lokr_w1 has shape [0, 4]"),
    "ia3_length": ("ia3", False, _set("weight", torch.ones(5)), (BAKE, INFO),
                   "(IA)3 vector has 5 values"),
    "no_down": ("lora", False, _drop("lora_down.weight"), ALL, "lacks lora_down.weight"),
    "dora_scalar": ("lora", True, _set("dora_scale", torch.tensor(1.0)), ALL,
                    "dora_scale has shape []"),
    # item 16: values
    "alpha_inf": ("lora", False, _set("alpha", torch.tensor(INF)), ALL, "alpha is inf"),
    "alpha_3e38": ("lora", False, _set("alpha", torch.tensor(3e38)), (BAKE, RESIZE), "alpha"),
    "up_nan": ("lora", False, _fill("lora_up.weight", NAN), ALL,
               "lora_up.weight holds NaN"),
    "dora_nan": ("lora", True, _fill("dora_scale", NAN), (BAKE, INFO, CONVERT),
                 "NaN"),
    "fp16_overflow": ("lora", False, _scaled(300.0), (BAKE,), "beyond the F16 range"),
}


def _malformed(root: Path, name: str) -> Path:
    kind, dora, change, _, _ = CASES[name]
    path = root / f"{name}.safetensors"
    write_lora(path, "sd1", kind=kind, text_encoder=False, dora=dora, dtype="F32", seed=3)
    keep_lora_modules(path, (LIN + ".",))
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=read_header(path).metadata)
    return path






def _args(command: str, lora: str, base: str, out: str) -> list[str]:
    if command == BAKE:
        return ["lora", "bake", base, lora, "-o", out, "-q"]
    if command == INFO:
        return ["lora", "info", lora, "--base", base]
    if command == RESIZE:
        return ["lora", "resize", lora, "--rank", "2", "-o", out, "-q"]
    return ["lora", "convert", lora, "--to", "peft", "-o", out, "-q"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> dict[str, object]:
    """Every command-line case of this file, run in this process."""
    root = tmp_path_factory.mktemp("lora-checks")
    base = str(models["sd1"])  # fp16
    cases: dict[str, list[str]] = {}
    outs: dict[str, Path] = {}
    for name, (_, _, _, commands, _) in CASES.items():
        lora = str(_malformed(root, name))
        for command in commands:
            outs[f"{name}/{command}"] = root / f"out_{name}_{command}.safetensors"
            cases[f"{name}/{command}"] = _args(command, lora, base,
                                               str(outs[f"{name}/{command}"]))
    lora, ia3 = root / "l.safetensors", root / "ia3.safetensors"
    write_lora(lora, "sd1", text_encoder=False, seed=1)
    write_lora(ia3, "sd1", kind="ia3", text_encoder=False, seed=2)
    keep_lora_modules(lora, (LIN + ".",))
    copy = root / "copy.safetensors"
    copy.write_bytes(models["sd1"].read_bytes())
    cases.update({
        "peft": ["lora", "convert", str(lora), "--to", "peft", "-o", "p.safetensors"],
        "comfy": ["lora", "convert", str(lora), "--to", "comfy", "-o", "c.safetensors"],
        "ia3": ["lora", "convert", str(ia3), "--to", "comfy", "-o", "i.safetensors"],
        "ia3_kohya": ["lora", "convert", str(ia3), "--to", "kohya", "-o", "k.safetensors"],
        "blocks": ["lora", "bake", base, str(lora), "--blocks", "INSS", "-o", "b.safetensors"],
        "same": ["lora", "extract", base, base, "--rank", "4", "-o", "e.safetensors"],
        "equal": ["lora", "extract", base, str(copy), "--rank", "4", "-o", "e.safetensors"],
    })
    return {"root": root, "outs": outs, "results": _console(cases, root)}


def test_malformed_adapters_exit_2_naming_the_module(cli: dict) -> None:
    """Every malformed module, through bake, info --base, resize and convert:
    exit 2, one stderr line naming the file and the module, no output file.
    (Before: exit 3 with ZeroDivisionError, IndexError, KeyError, a reshape
    or linalg.svd error, or exit 0 with NaN/Inf weights.)"""
    outs = cli["outs"]
    for case, out in outs.items():
        code, _, err = cli["results"][case]
        name = case.split("/")[0]
        lines = err.strip().splitlines()
        assert code == 2, (case, code, err)
        assert len(lines) == 1 and lines[0].startswith("modelkit: error: "), (case, err)
        assert f"{name}.safetensors" in lines[0] and LIN in lines[0], (case, err)
        assert CASES[name][4] in lines[0], (case, err)
        assert not out.exists(), case
    assert len(outs) == 44
    assert not [p for p in cli["root"].iterdir() if p.name.startswith((".", "out_"))]


def test_bake_range_check_follows_the_output_dtype(tmp_path: Path,
                                                   models: dict[str, Path]) -> None:
    """The values that overflow fp16 bake fine into fp32, exactly."""
    lora = _malformed(tmp_path, "fp16_overflow")
    ck = open_model(models["sd1"])
    step = bake(ck, [open_model(lora)], dtype="fp32")
    t = load_file(lora)
    up, down = t[f"{LIN}.lora_up.weight"], t[f"{LIN}.lora_down.weight"]
    got = step.source.get(LIN_KEY)
    assert got.dtype == torch.float32 and float(got.abs().max()) > 65504
    torch.testing.assert_close(got, ck.get(LIN_KEY).float() + up @ down)
    with pytest.raises(ModelkitError, match=r"attn1\.to_q\.weight: baking fp16_overflow"):
        bake(ck, [open_model(lora)]).source.get(LIN_KEY)


def test_a_base_that_already_holds_inf_is_passed_on(tmp_path: Path) -> None:
    """Only what the adapter makes non-finite is refused: a base weight that
    already holds Inf bakes (its Inf is the base's, not the adapter's)."""
    ck_path = tmp_path / "inf.safetensors"
    write_checkpoint(ck_path, "sd1", seed=1, dtype="F32")
    tensors = load_file(ck_path)
    tensors[LIN_KEY][0, 0] = INF
    save_file(tensors, ck_path, metadata=read_header(ck_path).metadata)
    lora = tmp_path / "l.safetensors"
    write_lora(lora, "sd1", text_encoder=False, dtype="F32", seed=3)
    got = bake(open_model(ck_path), [open_model(lora)]).source.get(LIN_KEY)
    assert float(got[0, 0]) == INF and bool(torch.isfinite(got[1:]).all())


# --- item 22: convert's readers, (IA)3 for ComfyUI, DoRA's strength rule -----------


def test_convert_names_its_readers_and_refuses_ia3_for_comfy(cli: dict) -> None:
    res, root = cli["results"], cli["root"]
    code, out, _ = res["peft"]
    assert code == 0 and "read by: diffusers/PEFT; ComfyUI skips its UNet attention" in out
    code, out, _ = res["comfy"]
    assert code == 0 and "read by: ComfyUI" in out
    code, _, err = res["ia3"]
    assert code == 2 and "is (IA)3, which ComfyUI has no adapter for" in err
    assert len(err.strip().splitlines()) == 1 and not (root / "i.safetensors").exists()
    assert res["ia3_kohya"][0] == 0


def test_dora_strength_rule_is_a1111_comfyui_with_the_updated_norm(tmp_path: Path) -> None:
    """docs/lora.md: W' = W + k·(m·W_c/‖W_c‖ − W), W_c = W + s·ΔW, ‖·‖ per
    output row for a per-output dora_scale, at k = 0.5. LyCORIS's own rule
    W_c·(1 + k·(m/‖W_c‖ − 1)) gives another weight at k ≠ 1."""
    ck_path = tmp_path / "ck.safetensors"
    write_checkpoint(ck_path, "sd1", seed=1, dtype="F32")
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(32, 4, generator=g), torch.randn(4, 32, generator=g)
    m = torch.rand(32, 1, generator=g) + 0.5
    path = tmp_path / "dora.safetensors"
    save_file({f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": down,
               f"{LIN}.alpha": torch.tensor(2.0), f"{LIN}.dora_scale": m}, path,
              metadata={"ss_base_model_version": "sd_v1"})
    ck = open_model(ck_path)
    w = ck.get(LIN_KEY).float()
    got = bake(ck, [(open_model(path), 0.5)]).source.get(LIN_KEY)
    wc = w + 0.5 * up @ down  # s = alpha / rank = 2 / 4
    norm = wc.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, w + 0.5 * (m * wc / norm - w), atol=1e-5, rtol=1e-5)
    lycoris = wc * (1 + 0.5 * (m / norm - 1))
    assert float((got - lycoris).abs().max()) > 1e-2
    full = bake(ck, [open_model(path)]).source.get(LIN_KEY)  # k = 1: every rule agrees
    torch.testing.assert_close(full, m * wc / norm, atol=1e-5, rtol=1e-5)


# --- item 4 (LoRA block presets), item 8 (extract A A), <lora:x:nan> in verify -------


def test_unknown_block_preset_extract_of_itself_and_nan_prompt_weight(cli: dict) -> None:
    from modelkit.arch.lora_blocks import parse_lora_blocks
    from modelkit.core.verify_library import parse_prompt
    from modelkit.core.verify_settings import VerifySettings

    with pytest.raises(ModelkitError, match=r"^unknown LoRA block weight preset 'INSS'; "
                                            r"known: NONE, ALL, INS, IND, INALL, MIDD, OUTD, "
                                            r"OUTS, OUTALL, ALL0\.5 \(or 12/20 values"):
        parse_lora_blocks("INSS", "sdxl")
    assert parse_lora_blocks("in_only", "sd1")["OUT00"] == 0  # merge presets still read
    for bad in ("nan", "inf", "-inf", " NaN "):
        with pytest.raises(ModelkitError, match="is not a finite number"):
            parse_prompt(f"a cat <lora:style:{bad}>")
    with pytest.raises(ModelkitError, match=r"<lora:style:inf>"):
        VerifySettings(prompts=("a cat <lora:style:inf>", "a dog")).validate()
    res, root = cli["results"], cli["root"]
    code, _, err = res["blocks"]
    assert code == 2 and "unknown LoRA block weight preset 'INSS'; known: NONE, ALL, INS" in err
    code, _, err = res["same"]
    assert code == 2 and "BASE and TUNED are the same file (sd1.safetensors)" in err
    code, _, err = res["equal"]
    assert code == 2 and "copy.safetensors does not differ from sd1.safetensors" in err
    assert not list(root.glob("[be].safetensors"))


def test_resize_refuses_factors_beyond_the_output_dtype(tmp_path: Path) -> None:
    """A finite ΔW whose singular values need factors beyond fp16 (±65504)
    is refused before anything is written; fp32 factors hold it."""
    from modelkit.lora import resize

    path = tmp_path / "big.safetensors"
    save_file({f"{LIN}.lora_up.weight": torch.full((32, 1), 1e5),
               f"{LIN}.lora_down.weight": torch.full((1, 32), 1e5)}, path,
              metadata={"ss_base_model_version": "sd_v1"})
    step = resize(open_model(path), rank=1, dtype="F16")
    with pytest.raises(ModelkitError, match=rf"^{LIN}: its factors exceed the F16 range"):
        step.prepare()
    ok = resize(open_model(path), rank=1, dtype="F32")
    ok.prepare()
    assert ok.report.relative_error < 1e-5
