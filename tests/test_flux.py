"""Flux.1 merge and LoRA bake (issue 19): block map, per-block merges checked
key by key on a reduced-width Flux, the dry run on full-size sparse headers,
kohya and diffusers/PEFT LoRAs baked with their exact ΔW, the refusals."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelkit.arch import flux
from modelkit.arch.blocks import block_of, count_text, parse_blocks, preset
from modelkit.arch.configs import UNET_PREFIX
from modelkit.arch.registry import handles
from modelkit.cli import main
from modelkit.core.recipe import Recipe
from modelkit.engine.runner import run
from modelkit.errors import ModelkitError
from modelkit.io.reader import open_model
from modelkit.testing import flux_config, write_checkpoint, write_flux, write_sparse_flux
from modelkit.testing.lora import write_flux_lora, write_lora
from tests.cli_support import cli as _cli
from tests.file_support import tensors as _tensors

P = UNET_PREFIX




# --- block map -------------------------------------------------------------------


def test_block_map_follows_comfyui_names() -> None:
    assert len(flux.BLOCKS) == 63 and flux.BLOCKS[5] == "double_blocks.0"
    cases = {
        "img_in.weight": "img_in", P + "time_in.out_layer.bias": "time_in",
        "guidance_in.in_layer.weight": "guidance_in", "vector_in.out_layer.weight": "vector_in",
        "txt_in.bias": "txt_in", P + "double_blocks.1.img_attn.qkv.weight": "double_blocks.1",
        "double_blocks.10.txt_mlp.2.weight": "double_blocks.10",
        "single_blocks.37.linear1.weight": "single_blocks.37",
        P + "final_layer.adaLN_modulation.1.weight": "final_layer",
        "single_blocks.38.linear1.weight": "img_in",  # no such block: the first entry
        "vae.decoder.conv_in.weight": "img_in",
    }
    assert {k: block_of(k, "flux") for k in cases} == cases
    assert count_text("flux").startswith("63 weights (img_in, time_in, guidance_in, "
                                         "vector_in, txt_in, double_blocks.0..18, "
                                         "single_blocks.0..37, final_layer")


def test_blocks_spec_names_groups_ranges_and_presets() -> None:
    w = parse_blocks("DOUBLE=1, single_blocks.3-single_blocks.5=0.25, Final_Layer=0.75, "
                     "double_blocks.2=0.5, default=0.125", "flux", vae_slot=True)
    assert list(w) == list(flux.BLOCKS)  # no VAE entry for Flux
    assert w["img_in"] == w["single_blocks.2"] == w["single_blocks.6"] == 0.125
    assert w["double_blocks.0"] == w["double_blocks.18"] == 1.0
    assert w["double_blocks.2"] == 0.5  # a name beats a group
    assert [w[f"single_blocks.{i}"] for i in (3, 4, 5)] == [0.25] * 3
    assert w["final_layer"] == 0.75
    assert parse_blocks([0.5] * 63, "flux") == dict.fromkeys(flux.BLOCKS, 0.5)
    g = preset("gradient_in_to_out", "flux")
    assert g["img_in"] == 0.0 and g["final_layer"] == 1.0 and g["double_blocks.0"] == 5 / 62
    assert set(preset("double_only", "flux").values()) == {0.0, 1.0}
    assert sum(preset("single_only", "flux").values()) == 38
    with pytest.raises(ModelkitError, match="unknown block 'IN00' for flux"):
        parse_blocks("IN00=1,default=0", "flux")
    with pytest.raises(ModelkitError, match="block list for flux has 26 values"):
        parse_blocks([0.0] * 26, "flux")
    with pytest.raises(ModelkitError, match="unknown block preset 'unet_only' for flux"):
        preset("unet_only", "flux")


def test_presets_command_lists_flux(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "presets", "--arch", "flux", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == set(flux.PRESET_DOCS)
    assert data["blocks_only"]["flux"]["txt_in"] == 0.0
    assert data["blocks_only"]["flux"]["single_blocks.0"] == 1.0


# --- merge ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("flux")
    a, b = d / "a.safetensors", d / "b.safetensors"
    write_flux(a, seed=1)
    write_flux(b, seed=2)
    return a, b


SPEC = "double_blocks.0=1,double_blocks.1=0.25,single=0.5,txt_in=0.75,default=0"


def test_block_merge_matches_hand_computed_weights(pair: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pair
    out = tmp_path / "m.safetensors"
    code, _, err = _cli(capsys, "merge", str(a), str(b), "-o", str(out), "-q", "--blocks", SPEC)
    assert code == 0, err
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(out)
    assert list(tm) == list(ta) and len(tm) == 84
    weights = parse_blocks(SPEC, "flux")
    seen = set()
    for key, got in tm.items():
        alpha = weights[block_of(key, "flux")]
        seen.add(alpha)
        assert got.dtype == torch.bfloat16, key  # bf16 inputs stay bf16
        if alpha == 0.0:
            want = ta[key]
        elif alpha == 1.0:
            want = tb[key]
        else:
            want = torch.lerp(ta[key].float(), tb[key].float(), alpha).to(torch.bfloat16)
        assert torch.equal(got, want), key
    assert seen == {0.0, 0.25, 0.5, 0.75, 1.0}


def test_merge_dtype_flag_still_wins(pair: tuple[Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pair
    out = tmp_path / "m16.safetensors"
    code, _, err = _cli(capsys, "merge", str(a), str(b), "-o", str(out), "-q", "--dtype", "fp16",
                        "--alpha", "0.5")
    assert code == 0, err
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(out)
    key = "double_blocks.1.img_attn.qkv.weight"
    assert tm[key].dtype == torch.float16
    assert torch.equal(tm[key], torch.lerp(ta[key].float(), tb[key].float(), 0.5).half())


def test_all_in_one_merges_the_transformer_and_keeps_a_s_other_parts(tmp_path: Path) -> None:
    a, b, out = (tmp_path / f"{n}.safetensors" for n in "abm")
    write_flux(a, all_in_one=True, seed=1)
    write_flux(b, all_in_one=True, seed=2)
    report = run(Recipe.merge(a, b, output=out, dtype="auto", alpha=1.0))
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(out)
    assert report.to_dict()["n_merged"] == 84  # the transformer; VAE and text encoders copied
    for key, got in tm.items():
        want = tb[key] if key.startswith(P) else ta[key]
        assert torch.equal(got, want), key


def test_dry_run_of_full_size_sparse_flux_dev(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_sparse_flux(a)
    write_sparse_flux(b)
    code, out, err = _cli(capsys, "merge", str(a), str(b), "-o", str(tmp_path / "c.sft"),
                          "--dry-run", "--json", "--blocks", "double=1,default=0")
    assert code == 0, err
    rep = json.loads(out)
    shapes = flux.transformer_keys(flux.VARIANTS["dev"])
    planned = sum(math.prod(s) * 2 for s in shapes.values())  # bf16 stays bf16
    assert 0 < rep["output_bytes"] - planned < 200_000  # the tensors and the header
    assert round(planned / 1e9, 1) == 23.8
    largest = 21504 * 3072  # single_blocks.N.linear1
    assert rep["peak_estimate_bytes"] == largest * 2 + (1 << 20) * 4 * 3
    assert not (tmp_path / "c.sft").exists()


# --- LoRA bake ----------------------------------------------------------------------


def _bake(base: Path, lora: str | Path, out: Path) -> None:
    assert main(["lora", "bake", str(base), str(lora), "-o", str(out), "-q"]) == 0


@pytest.fixture(scope="module")
def base32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux32") / "base.safetensors"
    write_flux(path, dtype="F32", seed=3)
    return path


def test_kohya_lora_bakes_exact_delta(base32: Path, tmp_path: Path) -> None:
    lora, out = tmp_path / "k.safetensors", tmp_path / "o.safetensors"
    write_flux_lora(lora, "kohya", rank=4, alpha=2.0, seed=5)
    _bake(base32, f"{lora}:0.5", out)
    w, la, got = _tensors(base32), _tensors(lora), _tensors(out)
    changed = 0
    for key, t in got.items():
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if not key.endswith(".weight") or f"{name}.lora_up.weight" not in la:
            assert torch.equal(t, w[key]), key
            continue
        up, down = la[f"{name}.lora_up.weight"], la[f"{name}.lora_down.weight"]
        want = w[key] + 0.25 * (up @ down)  # weight 0.5 x alpha/rank 2/4
        assert torch.equal(t, want), key
        changed += 1
    assert changed == 36  # fused qkv and linear1 are one module each


def test_peft_lora_bakes_split_qkv_and_mlp_into_fused_rows(base32: Path, tmp_path: Path
                                                           ) -> None:
    lora, out = tmp_path / "p.safetensors", tmp_path / "o.safetensors"
    write_flux_lora(lora, "peft", rank=4, alpha=8.0, alpha_in_metadata=True, seed=6)
    _bake(base32, lora, out)
    w, la, got = _tensors(base32), _tensors(lora), _tensors(out)
    h = flux_config().hidden_size

    def delta(name: str) -> torch.Tensor:  # alpha 8 / r 4 from the header metadata
        t = "transformer." + name
        return 2.0 * (la[f"{t}.lora_B.weight"] @ la[f"{t}.lora_A.weight"])

    qkv = "double_blocks.1.txt_attn.qkv.weight"
    want = w[qkv].clone()
    for j, p in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        want[j * h:(j + 1) * h] += delta(f"transformer_blocks.1.attn.{p}")
    assert torch.equal(got[qkv], want)
    lin1 = "single_blocks.0.linear1.weight"
    assert got[lin1].shape == (7 * h, h)
    want = w[lin1].clone()
    for j, p in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        want[j * h:(j + 1) * h] += delta(f"single_transformer_blocks.0.{p}")
    want[3 * h:] += delta("single_transformer_blocks.0.proj_mlp")
    assert torch.equal(got[lin1], want)
    for key, name in (("img_in.weight", "x_embedder"),
                      ("double_blocks.0.img_mod.lin.weight", "transformer_blocks.0.norm1.linear"),
                      ("single_blocks.1.linear2.weight", "single_transformer_blocks.1.proj_out"),
                      ("final_layer.linear.weight", "proj_out")):
        assert torch.equal(got[key], w[key] + delta(name)), key
    # diffusers' norm_out.linear is the final adaLN with its halves swapped
    adaln = delta("norm_out.linear")
    half = adaln.shape[0] // 2
    assert torch.equal(got["final_layer.adaLN_modulation.1.weight"],
                       w["final_layer.adaLN_modulation.1.weight"]
                       + torch.cat([adaln[half:], adaln[:half]]))


def test_peft_without_alpha_scales_by_one_and_bakes_into_all_in_one(tmp_path: Path) -> None:
    base, lora, out = (tmp_path / f"{n}.safetensors" for n in ("b", "l", "o"))
    write_flux(base, dtype="F32", all_in_one=True, seed=4)
    mod = "transformer.single_transformer_blocks.1.attn.to_k"
    write_flux_lora(lora, "peft", rank=2, modules=(mod,), seed=7)
    _bake(base, lora, out)
    w, la, got = _tensors(base), _tensors(lora), _tensors(out)
    key, h = P + "single_blocks.1.linear1.weight", flux_config().hidden_size
    want = w[key].clone()
    want[h:2 * h] += la[f"{mod}.lora_B.weight"] @ la[f"{mod}.lora_A.weight"]
    assert torch.equal(got[key], want)
    assert all(torch.equal(got[k], w[k]) for k in w if k != key)


def test_lora_of_the_other_family_is_refused_naming_both(
        tmp_path: Path, base32: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd, sd_lora, fl = (tmp_path / f"{n}.safetensors" for n in ("sd", "sdl", "fl"))
    write_checkpoint(sd)
    write_lora(sd_lora)
    write_flux_lora(fl, "kohya")
    code, _, err = _cli(capsys, "lora", "bake", str(sd), str(fl), "-o", str(tmp_path / "x"))
    assert code == 2
    assert "fl.safetensors: is a flux adapter but sd.safetensors is an sd1 checkpoint" in err
    code, _, err = _cli(capsys, "lora", "bake", str(base32), str(sd_lora), "-o",
                        str(tmp_path / "y"))
    assert code == 2
    assert "sdl.safetensors: is an sd1 adapter but base.safetensors is a flux checkpoint" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- what still refuses Flux.1 --------------------------------------------------------


def test_commands_not_done_refuse_flux_in_one_line(pair: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert handles("flux", "merge") and handles("flux", "lora bake")
    assert handles("flux", "quantize") and handles("flux", "prune")  # tests/test_family_merge.py


def test_recipe_takes_a_flux_preset_and_checks_it_per_architecture(
        pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\ninputs:\n  a: {a}\n  b: {b}\nsteps:\n  m:\n"
                      "    method: weighted_sum\n    models: [a, b]\n"
                      "    params:\n      alpha: {preset: single_only}\n"
                      "output:\n  path: out.safetensors\n")
    code, _, err = _cli(capsys, "recipe", "run", str(recipe), "-q")
    assert code == 0, err
    ta, tb, tm = _tensors(a), _tensors(b), _tensors(tmp_path / "out.safetensors")
    for key, got in tm.items():
        want = tb[key] if key.startswith("single_blocks.") else ta[key]
        assert torch.equal(got.to(want.dtype), want), key
    sd = tmp_path / "sd.safetensors"
    write_checkpoint(sd)
    code, _, err = _cli(capsys, "merge", str(sd), str(sd), "-o", str(tmp_path / "x"),
                        "--blocks", "single_only")
    assert code == 2 and "unknown block preset 'single_only'; known: flat_0" in err


def test_lora_info_names_a_peft_flux_lora(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    lora = tmp_path / "l.safetensors"
    write_flux_lora(lora, "peft")
    code, out, _ = _cli(capsys, "lora", "info", str(lora))
    assert code == 0 and "l.safetensors: peft for flux (peft names)" in out


def test_diffusers_layout_flux_bake_reports_the_blocks_the_base_lacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dl, lora = tmp_path / "dl.safetensors", tmp_path / "l.safetensors"
    write_sparse_flux(dl, tiny=True, layout="diffusers")  # one double, one single block
    write_flux_lora(lora, "kohya")  # fused qkv: split in the diffusers layout, two blocks
    # the fused modules of block 0 land row by row (tests/test_bake_split.py); block 1's
    # modules, diffusers-named or fused, have no target in this base
    code, _, err = _cli(capsys, "lora", "bake", str(dl), str(lora), "-o",
                        str(tmp_path / "x.safetensors"))
    assert code == 2, err
    assert "l.safetensors: 23 of 36 modules match dl.safetensors" in err, err
    assert "1 double_blocks.img_attn.qkv, 1 double_blocks.txt_attn.qkv" in err, err
    assert "--allow-unmatched" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_base_model_prefix_is_read_as_the_transformer(base32: Path, tmp_path: Path) -> None:
    src, lora, out = (tmp_path / f"{n}.safetensors" for n in ("p", "l", "o"))
    mod = "transformer.transformer_blocks.0.attn.to_v"
    write_flux_lora(src, "peft", rank=2, modules=(mod,), seed=8)
    tensors = _tensors(src)
    save_file({k.replace("transformer.", "base_model.model.", 1): v for k, v in tensors.items()},
              str(lora))
    _bake(base32, lora, out)
    w, got, h = _tensors(base32), _tensors(out), flux_config().hidden_size
    key = "double_blocks.0.img_attn.qkv.weight"
    want = w[key].clone()
    want[2 * h:] += tensors[f"{mod}.lora_B.weight"] @ tensors[f"{mod}.lora_A.weight"]
    assert torch.equal(got[key], want)


def test_bake_takes_flux_block_weights(base32: Path, tmp_path: Path) -> None:
    lora, out = tmp_path / "k.safetensors", tmp_path / "o.safetensors"
    write_flux_lora(lora, "kohya", rank=4, alpha=4.0, seed=9)
    assert main(["lora", "bake", str(base32), str(lora), "-o", str(out), "-q", "--blocks",
                 "double_blocks.1=0.5,single=1,default=0"]) == 0
    w, la, got = _tensors(base32), _tensors(lora), _tensors(out)
    for key, t in got.items():
        k = {"double_blocks.1": 0.5}.get(block_of(key, "flux"),
                                         1.0 if key.startswith("single_blocks.") else 0.0)
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if k == 0.0 or f"{name}.lora_up.weight" not in la:
            assert torch.equal(t, w[key]), key
        else:
            up, down = la[f"{name}.lora_up.weight"], la[f"{name}.lora_down.weight"]
            assert torch.equal(t, w[key] + k * (up @ down)), key


def test_bake_fast_route_writes_the_general_routes_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The written file (pread row chunks baked by one worker, or two,
    written at their offsets) holds the bytes the general route computes,
    chunk edges inside the q/k/v and MLP row slices included, for two
    adapters on the same rows and for a cast; and the fast route did bake
    every weight."""
    bake_mod = importlib.import_module("modelkit.lora.bake")  # the package exports bake()
    stream_mod = importlib.import_module("modelkit.lora.bake_stream")

    chunk = 5000  # 19 rows of 256: chunk edges fall inside every row slice
    monkeypatch.setattr(stream_mod, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(bake_mod, "CHUNK_ELEMENTS", chunk)
    streamed: list[str] = []
    real = stream_mod._bake_rows

    def spy(ck: object, key: str, *rest: object) -> None:
        streamed.append(key)
        real(ck, key, *rest)

    monkeypatch.setattr(stream_mod, "_bake_rows", spy)
    base, kohya, peft = (tmp_path / f"{n}.safetensors" for n in ("b", "k", "p"))
    write_flux(base, seed=11, depth=1, single=1)  # bf16, as Flux.1 ships
    write_flux_lora(kohya, "kohya", rank=4, alpha=2.0, seed=12, depth=1, single=1)
    write_flux_lora(peft, "peft", rank=4, alpha=8.0, alpha_in_metadata=True, seed=13, depth=1,
                    single=1)
    for dtype, workers in ((None, 1), ("fp16", 2)):
        monkeypatch.setattr(stream_mod, "WORKERS", workers)
        out = tmp_path / f"o{dtype}.safetensors"
        args = ["--dtype", dtype] if dtype else []
        assert main(["lora", "bake", str(base), f"{kohya}:0.7", f"{peft}:-1.5", "-o", str(out),
                     "-q", *args]) == 0
        step = bake_mod.bake(open_model(base), [(open_model(kohya), 0.7),
                                                (open_model(peft), -1.5)], dtype=dtype)
        got = _tensors(out)
        assert got.keys() == step.source.infos.keys()
        for key, t in got.items():
            assert torch.equal(t.view(torch.uint8), step.source.get(key).view(torch.uint8)), key
    assert len(streamed) == 2 * 23 and len(set(streamed)) == 23


def test_every_commands_help_names_the_families_it_handles(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each command's help ends with the families it handles, from the
    registry (a command that handles only some says which, and which it
    refuses); ``modelkit --help`` names every family."""
    from modelkit.arch import registry
    from modelkit.cli import SUBCOMMANDS
    from modelkit.cli.families import NO_MODEL

    def helped(*args: str) -> str:
        assert main([*args, "--help"]) == 0
        return " ".join(capsys.readouterr().out.split())

    top = helped()
    assert all(name in top for name in registry.names())
    for cmd in sorted(set(SUBCOMMANDS) - NO_MODEL):
        assert "Families: " in helped(cmd), cmd
    bake, prune = helped("lora", "bake"), helped("prune")
    assert f"Families: {registry.listed(registry.handling('lora bake'))}." in bake
    assert "flux" in bake.split("Refused")[0] and "flux" in prune and "Refused" not in prune
    assert "flux" in helped("lora").split("Families: ")[1].split(";")[0]
    assert "Families: " not in helped("methods")


def test_lora_info_reads_flux_loras_of_each_format(base32: Path, tmp_path: Path) -> None:
    """kohya, ComfyUI and PEFT Flux.1 LoRAs: ‖ΔW‖ per module and per block
    (the merge's block names), each PEFT q/k/v or MLP module against its own
    rows of the fused weight of a bare transformer base."""
    from modelkit.lora.info import info

    h = flux_config().hidden_size
    w = _tensors(base32)
    lin1 = w["single_blocks.0.linear1.weight"].double()
    rows = {"attn.to_q": lin1[:h], "attn.to_k": lin1[h:2 * h], "attn.to_v": lin1[2 * h:3 * h],
            "proj_mlp": lin1[3 * h:]}
    for naming in ("kohya", "comfyui", "peft"):
        lora = tmp_path / f"{naming}.safetensors"
        write_flux_lora(lora, naming, rank=4, alpha=2.0, alpha_in_metadata=True, seed=21)
        la = {k: t.double() for k, t in _tensors(lora).items()}
        rep = info(open_model(lora), open_model(base32))
        assert rep.arch == "flux" and not rep.unmatched
        for layer in rep.layers:
            if naming == "peft":
                up, down = la[f"{layer.name}.lora_B.weight"], la[f"{layer.name}.lora_A.weight"]
            else:
                up, down = la[f"{layer.name}.lora_up.weight"], la[f"{layer.name}.lora_down.weight"]
            scale = 0.5 if f"{layer.name}.alpha" in la or naming == "peft" else 1.0
            want = float((up @ down).norm()) * scale  # alpha 2 / rank 4, or no alpha
            assert layer.delta_norm == pytest.approx(want, rel=1e-5), layer.name
            assert layer.effective_rank == 4 and layer.block == block_of(layer.key, "flux")
        sums = {b: math.sqrt(sum((x.delta_norm or 0.0) ** 2 for x in rep.layers
                                 if x.block == b)) for b in rep.blocks}
        assert all(rep.blocks[b].delta_norm == pytest.approx(v, rel=1e-6)
                   for b, v in sums.items())
        if naming == "peft":
            part = "transformer.single_transformer_blocks.0."
            for name, ref in rows.items():
                layer = next(x for x in rep.layers if x.name == part + name)
                assert layer.base_norm == pytest.approx(float(ref.norm()), rel=1e-5), name


def test_verify_takes_nothing_but_the_transformer_from_a_bare_reference(tmp_path: Path
                                                                       ) -> None:
    """A bare transformer verified against a bare transformer: the reference
    lends no other component, so no key of the candidate's view is unknown."""
    from modelkit.testing import write_flux
    from modelkit.verify.models import open_model_under_test

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_flux(a, hidden=256, depth=1, single=1, seed=1)
    write_flux(b, hidden=256, depth=1, single=1, seed=2)
    ref = open_model_under_test(a)
    cand = open_model_under_test(b, ref)
    assert cand.completed and cand.report.unknown_keys == []
    assert all(k.startswith("model.diffusion_model.") for k in cand.render_source.infos)
    assert len(cand.render_source.infos) == len(cand.stored.infos)
