"""A transformer family's diffusers folder (``transformer/`` in one file or
in shards named by its ``.index.json``) read as one diffusers-layout model:
``convert`` writes it as one file, in either layout, bit-exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelkit.cli import main
from modelkit.errors import BadFileError
from modelkit.io.diffusers import is_diffusers_folder, open_diffusers
from modelkit.testing import write_flux

INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny Flux.1-dev (original layout), its diffusers-layout file, and a
    pipeline folder holding that file's tensors in two shards, with a vae/
    config beside."""
    root = tmp_path_factory.mktemp("flux-folder")
    orig, diff = root / "orig.safetensors", root / "diff.safetensors"
    write_flux(orig, depth=1, single=1, seed=3)
    assert main(["convert", str(orig), "-o", str(diff), "--layout", "diffusers", "-q"]) == 0
    folder = root / "FLUX.1-dev"
    (folder / "transformer").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (folder / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel"}))
    tensors = load_file(diff)
    keys = list(tensors)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, folder / "transformer" / name)
    (folder / "transformer" / INDEX).write_text(json.dumps(
        {"weight_map": {k: name for name, part in halves.items() for k in part}}))
    return orig, diff, folder


def _same(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert set(ta) == set(tb)
    for key, t in ta.items():
        assert t.dtype == tb[key].dtype and torch.equal(t, tb[key]), key


def test_a_sharded_transformer_folder_converts_to_one_file_in_either_layout(
        flux_folder: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The pipeline folder and its transformer/ folder are both accepted; the
    shards come out as the one diffusers-layout file they were cut from, and
    ``--layout original`` gives back the original Flux file; the other
    components are named as not included."""
    orig, diff, folder = flux_folder
    assert is_diffusers_folder(folder) and is_diffusers_folder(folder / "transformer")
    src = open_diffusers(folder)
    assert src.notes == ["read transformer/ (2 files); vae/ not included: give those "
                         "components as files"]
    assert sorted(p.name for p in src.input_paths) == sorted(
        p.name for p in (folder / "transformer").glob("*.safetensors"))
    one, back = tmp_path / "one.safetensors", tmp_path / "back.safetensors"
    assert main(["convert", str(folder), "-o", str(one), "-q"]) == 0
    _same(one, diff)
    assert main(["convert", str(folder / "transformer"), "-o", str(back), "--layout",
                 "original", "-q"]) == 0
    _same(back, orig)


def test_a_bad_shard_index_is_refused_naming_it(flux_folder: tuple[Path, Path, Path],
                                                tmp_path: Path) -> None:
    """A weight_map naming a file outside the folder, and two shards holding
    the same tensor, are refused in one line before anything is written."""
    _, diff, _ = flux_folder
    folder = tmp_path / "bad" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    index = folder / INDEX
    index.write_text(json.dumps({"weight_map": {"img_in.weight": "../../x.safetensors"}}))
    with pytest.raises(BadFileError, match=re.escape(
            "weight_map names '../../x.safetensors', not a file of this folder")):
        open_diffusers(folder)
    tensors = load_file(diff)
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"img_in.weight": tensors["x_embedder.weight"]}, folder / name)
    index.write_text(json.dumps({"weight_map": {"img_in.weight": "a.safetensors",
                                                "x": "b.safetensors"}}))
    with pytest.raises(BadFileError, match=re.escape(
            "b.safetensors: tensor 'img_in.weight' is also in a.safetensors; the shards overlap")):
        open_diffusers(folder)
