"""inspect tells the truth about standalone components and agrees with prune
on what a key is (issue 9 items 2 and 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelkit.cli.inspect_cmd import render
from modelkit.fuzz import run_cli
from modelkit.inspect.report import inspect_model


def _d(path: Path) -> dict:
    return inspect_model(path).to_dict()


@pytest.fixture(scope="module")
def extracted(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """What ``modelkit extract`` writes, through the CLI."""
    root = tmp_path_factory.mktemp("extracted")
    out = {}
    for name, model, comp in (("sd1_te", "sd1", "te"), ("sd1_vae", "sd1", "vae"),
                              ("xl_unet_v", "sdxl_vpred", "unet"), ("xl_te", "sdxl", "te"),
                              ("xl_te2", "sdxl", "te2")):
        out[name] = root / f"{name}.safetensors"
        rc, _, err = run_cli(["extract", str(models[model]), "--component", comp,
                              "-o", str(out[name]), "-q"])
        assert rc == 0, err
    return out


@pytest.mark.parametrize(("name", "kind", "comp", "n"), [
    ("sdxl_unet", "unet", "unet", 1680), ("vae", "vae", "vae", 248)])
def test_standalone_components_have_no_unknown_keys(models: dict[str, Path], name: str,
                                                    kind: str, comp: str, n: int) -> None:
    d = _d(models[name])
    assert d["kind"] == kind and d["components"][comp]["n_tensors"] == n
    assert d["components"][comp]["complete"] is True
    assert d["unknown_keys"] == [] and d["extra_keys"] == {}
    assert not any("unknown" in note for note in d["notes"])
    assert "unknown" not in render(inspect_model(models[name])).split("components")[1]


@pytest.mark.parametrize(("name", "kind", "comps", "extra"), [
    ("sd1_te", "text_encoder", ["te"], {}),
    ("sd1_vae", "vae", ["vae"], {}),
    ("xl_unet_v", "unet", ["unet"], {"prediction_markers": 2}),
    ("xl_te", "text_encoder", ["te1", "te2"], {}),
    ("xl_te2", "text_encoder", ["te"], {}),
])
def test_extracted_files(extracted: dict[str, Path], name: str, kind: str,
                         comps: list[str], extra: dict[str, int]) -> None:
    rc, out, err = run_cli(["inspect", "--json", str(extracted[name])])
    assert rc == 0, err
    d = json.loads(out)
    assert d["kind"] == kind and sorted(d["components"]) == comps
    assert all(c["complete"] for c in d["components"].values()), d["components"]
    assert d["unknown_keys"] == [] and d["extra_keys"] == extra
    if name == "xl_unet_v":  # the markers stay markers, and say v-prediction
        assert d["prediction"]["type"] == "v"


def test_bare_file_with_stray_keys(tmp_path: Path) -> None:
    """Root buffers and junk in a standalone UNet are classified, not folded
    into the UNet; keys no table knows are still listed."""
    from modelkit.arch.configs import TINY
    from modelkit.arch.keys import unet_keys
    from modelkit.testing import write_tensors

    keys = dict(unet_keys(TINY["sd1"].unet))
    keys |= {"betas": (1000,), "model_ema.decay": (), "lora_te_x.alpha": (),
             "some.stray.key": (3,)}
    path = tmp_path / "unet_extra.safetensors"
    write_tensors(path, keys)
    d = _d(path)
    assert d["kind"] == "unet" and d["components"]["unet"]["complete"] is True
    assert d["components"]["unet"]["n_unexpected"] == 1  # some.stray.key
    assert d["extra_keys"] == {"ema": 1, "schedule_buffers": 1, "training_leftovers": 1}
    assert d["unknown_keys"] == []


def test_inspect_and_prune_classify_alike(models: dict[str, Path]) -> None:
    """One table (modelkit.arch.parts): inspect's extra keys are what prune drops."""
    from modelkit.convert.prune import DROP_REASONS, prune
    from modelkit.inspect.report import EXTRA_KEY_NAMES
    from modelkit.io.reader import open_model

    d = _d(models["sd1_ema"])
    with open_model(models["sd1_ema"]) as src:
        dropped = prune(src).report.dropped_by_reason()
    by_reason = {DROP_REASONS[part]: EXTRA_KEY_NAMES[part] for part in DROP_REASONS
                 if part in EXTRA_KEY_NAMES}
    assert dropped == {"EMA weights": 688, "schedule buffer": 12}
    assert {by_reason[r]: n for r, n in dropped.items()} == d["extra_keys"]
    assert d["n_ema_tensors"] == 686  # the LitEma weight copies, one per UNet tensor
    rc, out, _ = run_cli(["inspect", str(models["sd1_ema"])])
    assert rc == 0 and "yes, 686 tensors (688 model_ema. keys" in out
    assert "extra keys  ema 688, schedule_buffers 12" in out
