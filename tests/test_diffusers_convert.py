"""Diffusers folder <-> original single file: lossless both ways, loadable by
diffusers/transformers, and the same tensors diffusers' own converter gives."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_diffusers, write_source
from safetensors.torch import load_file, save_file

from modelkit.errors import BadFileError, ModelkitError, OutputError
from modelkit.io.diffusers import EXTRA_FILE, is_diffusers_folder, open_diffusers
from modelkit.io.reader import open_model
from modelkit.io.source import DerivedSource, Source
from modelkit.io.writer import tensor_bytes
from modelkit.testing import write_checkpoint

ARCHS = ("sd1", "sd2", "sdxl")
META = {"ss_output_name": "tiny", "modelspec.title": "tiny", "sd_merge_models": "{}",
        "modelkit.synthetic": "1"}
FIXTURES = {
    "sd1": dict(ema=True, dtype="F32", metadata=META),
    "sd2": dict(metadata={**META, "modelspec.prediction_type": "v"}),
    "sdxl": dict(markers=("v_pred", "ztsnr"), metadata=META),
    "sdxl_refiner": dict(),
}
COMPONENT_FILES = ("unet/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                   EXTRA_FILE)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers_src")
    out = {}
    for i, (arch, kw) in enumerate(FIXTURES.items()):
        out[arch] = root / f"{arch}.safetensors"
        write_checkpoint(out[arch], arch, seed=20 + i, **kw)
    return out


@pytest.fixture(scope="module")
def folders(ckpts: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for arch, path in ckpts.items():
        out[arch] = path.parent / f"{arch}_diffusers"
        with open_model(path) as src:
            write_diffusers(src, out[arch])
    return out


def bits(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes: equal bits, not just equal values (-0.0, NaN)."""
    return bytes(tensor_bytes(t))


def assert_same_tensors(a: Source, b: Source) -> None:
    """Same key set; every tensor with the same dtype, shape and bits."""
    assert set(a.infos) == set(b.infos)
    for key, info in a.infos.items():
        assert b.infos[key].dtype == info.dtype, key
        ta, tb = a.get(key), b.get(key)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, key
        assert bits(ta) == bits(tb), key


def assert_same_files(a: Path, b: Path, names: tuple[str, ...] = COMPONENT_FILES) -> None:
    """The writer is deterministic: same tensors, names and order give the
    same bytes."""
    for name in names:
        assert (a / name).exists() == (b / name).exists(), name
        if (a / name).exists():
            assert filecmp.cmp(a / name, b / name, shallow=False), name


# --- lossless round trips --------------------------------------------------------


@pytest.mark.parametrize("arch", [*ARCHS, "sdxl_refiner"])
def test_original_to_folder_to_original_is_bit_exact(ckpts: dict[str, Path],
                                                     folders: dict[str, Path],
                                                     arch: str) -> None:
    with open_model(ckpts[arch]) as src:
        back = open_diffusers(folders[arch])
        assert_same_tensors(src, back)
        assert back.metadata == src.metadata
        assert back.notes == []


@pytest.mark.parametrize("arch", ARCHS)
def test_folder_to_original_to_folder_is_bit_exact(folders: dict[str, Path], arch: str,
                                                   tmp_path: Path) -> None:
    single = tmp_path / "single.safetensors"
    write_source(open_diffusers(folders[arch]), single)
    with open_model(single) as src:
        write_diffusers(src, tmp_path / "again")
    assert_same_files(folders[arch], tmp_path / "again")
    for cfg in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                "vae/config.json", "text_encoder/config.json"):
        assert json.loads((folders[arch] / cfg).read_text()) == \
            json.loads((tmp_path / "again" / cfg).read_text())


def test_homeless_keys_and_metadata_go_to_the_extras_file(folders: dict[str, Path]) -> None:
    extra = {a: open_model(folders[a] / EXTRA_FILE) for a in ARCHS}
    assert extra["sd1"].metadata == META
    sd1 = set(extra["sd1"].infos)
    assert "betas" in sd1 and "model_ema.decay" in sd1
    assert any(k.startswith("model_ema.diffusion_model") for k in sd1)
    assert not any(k.startswith(("model.", "first_stage_model.", "cond_stage")) for k in sd1)
    # diffusers' SD2 text encoder: 23 layers, no projection, no logit_scale
    p = "cond_stage_model.model."
    assert {p + "text_projection", p + "logit_scale",
            p + "transformer.resblocks.23.attn.in_proj_weight"} <= set(extra["sd2"].infos)
    assert p + "transformer.resblocks.22.attn.in_proj_weight" not in extra["sd2"].infos
    assert set(extra["sdxl"].infos) == {"v_pred", "ztsnr",
                                        "conditioner.embedders.1.model.logit_scale"}
    te = json.loads((folders["sd2"] / "text_encoder/config.json").read_text())
    assert te["num_hidden_layers"] == 23 and te["architectures"] == ["CLIPTextModel"]


def test_key_map_facts(ckpts: dict[str, Path], folders: dict[str, Path]) -> None:
    src = load_file(ckpts["sdxl"])
    te2 = load_file(folders["sdxl"] / "text_encoder_2/model.safetensors")
    vae = load_file(folders["sdxl"] / "vae/diffusion_pytorch_model.safetensors")
    p = "conditioner.embedders.1.model."
    fused = src[p + "transformer.resblocks.3.attn.in_proj_weight"]
    w = fused.shape[1]
    for i, part in enumerate("qkv"):
        got = te2[f"text_model.encoder.layers.3.self_attn.{part}_proj.weight"]
        assert torch.equal(got, fused[i * w:(i + 1) * w])
    assert torch.equal(te2["text_projection.weight"], src[p + "text_projection"].t())
    assert torch.equal(vae["encoder.mid_block.attentions.0.to_q.weight"],
                       src["first_stage_model.encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert torch.equal(vae["decoder.up_blocks.0.resnets.0.conv1.weight"],
                       src["first_stage_model.decoder.up.3.block.0.conv1.weight"])
    assert torch.equal(vae["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"],
                       src["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"])


def test_scheduler_prediction_type(folders: dict[str, Path]) -> None:
    def sched(arch: str) -> dict[str, object]:
        return json.loads((folders[arch] / "scheduler/scheduler_config.json").read_text())

    assert sched("sd1")["prediction_type"] == "epsilon"
    assert sched("sd2")["prediction_type"] == "v_prediction"  # from metadata
    xl = sched("sdxl")
    assert xl["prediction_type"] == "v_prediction" and xl["rescale_betas_zero_snr"] is True
    index = json.loads((folders["sdxl_refiner"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == [None, None]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]


# --- atomicity and refusals --------------------------------------------------------


def test_error_midway_leaves_nothing(ckpts: dict[str, Path], tmp_path: Path) -> None:
    src = open_model(ckpts["sd1"])

    def produce(key: str) -> torch.Tensor:
        if key.startswith("first_stage_model.decoder"):
            raise RuntimeError("disk on fire")
        return src.get(key)

    broken = DerivedSource("broken", src.infos, src.metadata, produce, src.input_paths)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_diffusers(broken, out)
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_target_and_input(ckpts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with open_model(ckpts["sd1"]) as src:
        with pytest.raises(OutputError, match="not empty"):
            write_diffusers(src, tmp_path / "full")
        with pytest.raises(OutputError):
            write_diffusers(src, ckpts["sd1"])
        (tmp_path / "empty").mkdir()
        write_diffusers(src, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    assert is_diffusers_folder(tmp_path / "empty")
    assert not is_diffusers_folder(ckpts["sd1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]


def test_not_a_checkpoint(ckpts: dict[str, Path], tmp_path: Path) -> None:
    src = open_model(ckpts["sd1"])
    vae = {k: i for k, i in src.infos.items() if k.startswith("first_stage_model.")}
    vae_only = DerivedSource("vae-only", vae, {}, src.get, src.input_paths)
    with pytest.raises(ModelkitError, match="no LDM UNet"):
        write_diffusers(vae_only, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_errors_name_the_problem(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BadFileError, match="not a folder"):
        open_diffusers(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(folders["sd2"], broken)
    te = broken / "text_encoder/model.safetensors"
    tensors = load_file(te)
    del tensors["text_model.encoder.layers.5.self_attn.k_proj.weight"]
    save_file(tensors, te, metadata={"format": "pt"})
    with pytest.raises(BadFileError, match=r"layers\.5\.self_attn\.k_proj\.weight.*fused"):
        open_diffusers(broken)
    (broken / "unet/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BadFileError, match="unet: no weights"):
        open_diffusers(broken)


# --- diffusers and transformers themselves --------------------------------------


def test_diffusers_loads_written_folders(ckpts: dict[str, Path], folders: dict[str, Path],
                                         tmp_path: Path) -> None:
    """Load the tiny SDXL folder with diffusers/transformers offline, save it
    back with them (a real diffusers folder: no extras file, fp16 variant,
    transformers' own key names) and read that folder back."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    folder, real = folders["sdxl"], tmp_path / "real"
    classes = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
               "text_encoder": transformers.CLIPTextModel,
               "text_encoder_2": transformers.CLIPTextModelWithProjection}
    for name, cls in classes.items():
        model, info = cls.from_pretrained(folder / name, output_loading_info=True,
                                          torch_dtype=torch.float16)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys",
                                          "mismatched_keys")), name
        ours = load_file(next((folder / name).glob("*.safetensors")))
        state = model.state_dict()
        for key, t in ours.items():
            if key.endswith("position_ids"):
                continue  # a non-persistent buffer: transformers accepts and rebuilds it
            loaded = state.get(key, state.get(key.removeprefix("text_model.")))
            assert loaded is not None and torch.equal(loaded, t), (name, key)
        model.save_pretrained(real / name, variant="fp16" if name == "unet" else None)
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    assert sched.config.prediction_type == "v_prediction"
    sched.save_pretrained(real / "scheduler")

    back = open_diffusers(real)
    assert any("no modelkit_extra" in n for n in back.notes)
    position_ids = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    with open_model(ckpts["sdxl"]) as src:
        # transformers does not save position_ids; logit_scale has no diffusers home
        homeless = {"conditioner.embedders.1.model.logit_scale", position_ids}
        assert set(back.infos) == set(src.infos) - homeless
        for key in back.infos:
            if key not in ("v_pred", "ztsnr"):  # markers come back from the scheduler
                assert torch.equal(back.get(key), src.get(key)), key
    single = tmp_path / "single.safetensors"
    write_source(back, single)
    with open_model(single) as again:
        write_diffusers(again, tmp_path / "again")
    for name in COMPONENT_FILES[:4]:
        ours, theirs = load_file(folder / name), load_file(tmp_path / "again" / name)
        assert set(ours) - set(theirs) <= {"text_model.embeddings.position_ids"}
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_matches_diffusers_single_file_converter(ckpts: dict[str, Path],
                                                 folders: dict[str, Path]) -> None:
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    for arch in ("sd1", "sd2"):
        ck, folder = load_file(ckpts[arch]), folders[arch]
        unet_cfg = json.loads((folder / "unet/config.json").read_text())
        vae_cfg = json.loads((folder / "vae/config.json").read_text())
        if arch == "sd1":
            te = su.convert_ldm_clip_checkpoint(ck)
        else:
            te = su.convert_open_clip_checkpoint(None, ck, prefix="cond_stage_model.model.")
        theirs = {"unet": su.convert_ldm_unet_checkpoint(ck, unet_cfg),
                  "vae": su.convert_ldm_vae_checkpoint(ck, vae_cfg), "text_encoder": te}
        for name, tensors in theirs.items():
            ours = load_file(next((folder / name).glob("*.safetensors")))
            assert set(ours) == set(tensors), (arch, name)
            assert all(torch.equal(ours[k], tensors[k]) for k in ours), (arch, name)


def test_names_module_does_not_import_torch() -> None:
    code = ("import sys, modelkit.arch.diffusers_names as d\n"
            "from modelkit.arch.configs import SDXL\n"
            "d.diffusers_layout(SDXL); d.unet_config(SDXL, 'x')\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
