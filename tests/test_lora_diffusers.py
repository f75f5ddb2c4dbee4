"""modelkit's bake equals diffusers' runtime application (load_lora_weights +
fuse_lora) for the formats diffusers supports; a modelkit-extracted LoRA
loads in diffusers with every key mapped; the CLI's exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_converted, write_diffusers
from safetensors.torch import load_file, save_file

from modelkit.io.reader import open_model
from modelkit.lora import bake, extract
from modelkit.testing import write_checkpoint
from modelkit.testing.lora import write_lora


@pytest.fixture(autouse=True, scope="module")
def _hf_libraries() -> None:
    """Skip the module without diffusers, peft or transformers. Imported here,
    not at module level: collecting this file cost every xdist worker ~3 s of
    imports, also the one that runs none of its tests."""
    for name in ("diffusers", "peft", "transformers"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_diffusers")
    out = {}
    for arch, seed in (("sd1", 31), ("sdxl", 32)):
        out[arch] = root / f"{arch}.safetensors"
        write_checkpoint(out[arch], arch, seed=seed, dtype="F32")
        out[arch + "_folder"] = root / f"{arch}_diffusers"
        with open_model(out[arch]) as src:
            write_diffusers(src, out[arch + "_folder"])
    return out


@pytest.fixture(scope="module")
def pipes(ckpts: dict[str, Path]) -> dict[str, object]:
    """One pipeline per architecture, shared: each test unfuses and unloads
    its adapter afterwards."""
    return {arch: _pipeline(ckpts[arch + "_folder"], arch) for arch in ("sd1", "sdxl")}


# a few modules of every kind (attention, ResBlock convs, SD1's up_blocks.0
# upsampler, down/upsamplers, text-encoder layers 0-1) keep diffusers' loading quick
SUBSET = ("lora_unet_down_blocks_1_", "lora_unet_up_blocks_0_", "lora_unet_mid_block_resnets_0",
          "lora_unet_input_blocks_4_1_transformer_blocks_0_", "unet.down_blocks.1.attentions.0.",
          "lora_te_text_model_encoder_layers_0_", "lora_te1_text_model_encoder_layers_1_",
          "lora_te2_text_model_encoder_layers_0_", "text_encoder.text_model.encoder.layers.1.")


def _subset(path: Path) -> None:
    tensors = load_file(path)
    keep = {k: v for k, v in tensors.items() if k.startswith(SUBSET)}
    save_file(keep, path, metadata=open_model(path).metadata)


def _pipeline(folder: Path, arch: str) -> object:
    import diffusers
    import transformers

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae")
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    te = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    if arch == "sdxl":
        te2 = transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=None, tokenizer_2=None,
            unet=unet, scheduler=sched)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _components(arch: str) -> tuple[str, ...]:
    return ("unet", "text_encoder", "text_encoder_2") if arch == "sdxl" else (
        "unet", "text_encoder")


@pytest.mark.parametrize(("arch", "kind", "conv"), [("sd1", "lora", True), ("sd1", "peft", False),
                                                    ("sdxl", "lora", False)])
def test_bake_equals_diffusers_fuse_lora(ckpts: dict[str, Path], pipes: dict[str, object],
                                         tmp_path: Path, arch: str, kind: str,
                                         conv: bool) -> None:
    lora = tmp_path / "lora.safetensors"
    # peft without adapter metadata: diffusers infers its config (scale 1) from the keys
    write_lora(lora, arch, kind=kind, conv=conv, rank=4, alpha=2.0 if kind == "lora" else None,
               dtype="F32", seed=33, with_metadata=kind != "peft")
    _subset(lora)
    pipe = pipes[arch]
    pipe.load_lora_weights(str(lora), adapter_name="t")
    pipe.fuse_lora(adapter_names=["t"])
    baked = tmp_path / "baked"
    write_diffusers(bake(open_model(ckpts[arch]), [open_model(lora)]).source, baked)
    for comp in _components(arch):
        ours = load_file(next((baked / comp).glob("*.safetensors")))
        base = load_file(next((ckpts[arch + "_folder"] / comp).glob("*.safetensors")))
        theirs = {k.replace(".base_layer", ""): v for k, v in
                  getattr(pipe, comp).state_dict().items() if "lora_" not in k}
        changed = 0
        for key, t in ours.items():
            if key.endswith("position_ids"):
                continue
            other = theirs.get(key, theirs.get(key.removeprefix("text_model.")))
            assert other is not None, (comp, key)
            torch.testing.assert_close(other, t, atol=1e-6, rtol=1e-6)
            changed += not torch.equal(t, base[key])
        assert changed > 0, comp
    pipe.unfuse_lora()
    pipe.unload_lora_weights()


def test_extracted_lora_loads_in_diffusers_with_every_key(ckpts: dict[str, Path],
                                                          pipes: dict[str, object],
                                                          tmp_path: Path) -> None:
    import diffusers

    lora, tuned, out = (tmp_path / n for n in ("l.safetensors", "t.safetensors",
                                                "x.safetensors"))
    write_lora(lora, "sd1", conv=True, dtype="F32", seed=34)
    _subset(lora)
    write_converted(bake(open_model(ckpts["sd1"]), [open_model(lora)]), tuned)
    write_converted(extract(open_model(ckpts["sd1"]), open_model(tuned), rank=4, conv_rank=4),
                    out)
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(out))
    n_modules = sum(k.endswith(".alpha") for k in load_file(out))
    assert n_modules > 20 and len(alphas) == n_modules and len(state) == 2 * n_modules
    pipe = pipes["sd1"]
    pipe.load_lora_weights(str(out), adapter_name="x")
    assert pipe.get_list_adapters() == {"unet": ["x"], "text_encoder": ["x"]}
    loaded = sum(k.count("lora_A") for comp in ("unet", "text_encoder")
                 for k in getattr(pipe, comp).state_dict())
    pipe.unload_lora_weights()
    assert loaded == n_modules


def test_cli_exit_codes_through_console_script(ckpts: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from modelkit.cli import main

    lora, out = tmp_path / "l.safetensors", tmp_path / "o.safetensors"
    write_lora(lora, "sd1", seed=35)
    assert main(["lora", "bake", str(ckpts["sd1"]), f"{lora}:0.5:0.2", "-o", str(out), "-q"]) == 0
    assert "keys touched" in capsys.readouterr().out and out.exists()
    assert main(["lora", "bake", str(ckpts["sdxl"]), str(lora), "-o",
                 str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and not (tmp_path / "x.safetensors").exists()
    assert "is an sd1 adapter but sdxl.safetensors is an sdxl checkpoint" in err
    # the real console script: an existing output is refused (exit 2, one line)
    script = Path(sys.executable).with_name("modelkit")
    again = subprocess.run([str(script), "lora", "bake", str(ckpts["sd1"]), str(lora), "-o",
                            str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "already exists; pass --overwrite" in again.stderr
