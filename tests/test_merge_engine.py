"""End-to-end merges on tiny fixtures: exactness, block-wise weights, the
correctness rules, recipes and provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_recipe
from safetensors.torch import load_file

from modelkit import testing as t
from modelkit.arch.blocks import block_of
from modelkit.cli import main
from modelkit.core.recipe import RecipeError, load_recipe, parse_recipe
from modelkit.errors import ModelkitError
from modelkit.io.header import read_header

UNET = "model.diffusion_model."
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKIT_CACHE_DIR", str(tmp_path / "cache"))


def _merge(*args: str) -> int:
    return main(["merge", *args, "-q"])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> None:
    for k in keys:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_alpha_0_gives_a_and_1_gives_b(tmp_path: Path, models: dict[str, Path]) -> None:
    a, b = models["sd1"], models["sd1_b"]
    for alpha, ref in (("0", a), ("1", b)):
        out = tmp_path / f"m{alpha}.safetensors"
        assert _merge(str(a), str(b), "-o", str(out), "--alpha", alpha) == 0
        got, want = load_file(out), load_file(ref)
        assert set(got) == set(want)
        _same(got, want, [k for k in want if k.startswith(("model.", "first_stage",
                                                           "cond_stage"))])


def test_weighted_sum_value(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "m.safetensors"
    assert _merge(str(models["sd1"]), str(models["sd1_b"]), "-o", str(out), "--alpha",
                  "0.25", "--dtype", "fp32") == 0
    a, b, m = load_file(models["sd1"]), load_file(models["sd1_b"]), load_file(out)
    key = UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.allclose(m[key], 0.75 * a[key].float() + 0.25 * b[key].float(), atol=1e-6)
    big = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    assert m[big].numel() > (1 << 20)  # chunked path
    assert torch.allclose(m[big], torch.lerp(a[big].float(), b[big].float(), 0.25), atol=1e-6)
    assert m[POS].dtype == torch.int64 and torch.equal(m[POS][0], torch.arange(77))
    # schedule buffers are not in any component: copied from A byte for byte
    assert m["betas"].dtype == torch.float32 and torch.equal(m["betas"], a["betas"])


def test_add_difference_with_b_equal_c_gives_a(tmp_path: Path, models: dict[str, Path]
                                               ) -> None:
    out = tmp_path / "ad.safetensors"
    assert _merge(str(models["sd1"]), str(models["sd1_b"]), str(models["sd1_b"]), "-o",
                  str(out), "--method", "add_difference", "--alpha", "0.7") == 0
    got, want = load_file(out), load_file(models["sd1"])
    _same(got, want, list(want))


def test_blockwise_out_only(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "bw.safetensors"
    assert _merge(str(models["sdxl_vpred"]), str(models["sdxl"]), "-o", str(out),
                  "--blocks", "out_only") == 0
    a, b, m = load_file(models["sdxl_vpred"]), load_file(models["sdxl"]), load_file(out)
    for key in a:
        if not key.startswith(UNET):
            continue
        block = block_of(key, "sdxl")
        ref = b if block.startswith("OUT") else a
        assert torch.equal(m[key], ref[key]), (key, block)
    assert "v_pred" in m  # marker keys of A are copied


def test_standalone_unets_without_prefix_merge_block_wise(tmp_path: Path) -> None:
    """ComfyUI-style UNet files (no model.diffusion_model. prefix) merge
    every key, and their keys find their blocks (they were once all copied
    from A with 0 merged)."""
    a, b, out = (tmp_path / n for n in ("a.safetensors", "b.safetensors", "o.safetensors"))
    t.write_unet(a, "sd1", seed=1)
    t.write_unet(b, "sd1", seed=2)
    assert _merge(str(a), str(b), "-o", str(out), "--blocks", "out_only", "--dtype",
                  "fp32") == 0
    ta, tb, m = load_file(a), load_file(b), load_file(out)
    assert set(m) == set(ta)
    for key in ta:
        block = block_of(UNET + key, "sd1")
        ref = tb if block.startswith("OUT") else ta
        assert torch.equal(m[key], ref[key].float()), (key, block)
    assert any(block_of(UNET + k, "sd1").startswith("OUT") for k in ta)


def test_blocks_list_and_recorded_map(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "bl.safetensors"
    values = ["0"] * 13 + ["1"] * 13  # BASE, IN00-IN11 -> 0; M00, OUT -> 1
    assert _merge(str(models["sd1"]), str(models["sd1_b"]), "-o", str(out), "--blocks",
                  ",".join(values)) == 0
    m, a, b = load_file(out), load_file(models["sd1"]), load_file(models["sd1_b"])
    _same(m, a, [UNET + "input_blocks.11.0.out_layers.3.weight", UNET + "time_embed.0.weight",
                 "first_stage_model.decoder.conv_out.weight"])
    _same(m, b, [UNET + "middle_block.1.proj_in.weight", UNET + "out.2.weight"])
    meta = read_header(out).metadata
    assert meta["modelkit.block_map"] == "supermerger"
    # A1111's name for the method (the engine issue asks for A1111's names)
    assert json.loads(meta["sd_merge_recipe"])["interp_method"] == "Weighted sum"


def test_arch_mismatch_is_refused_before_math(tmp_path: Path, models: dict[str, Path]
                                             ) -> None:
    out = tmp_path / "x.safetensors"
    with pytest.raises(ModelkitError, match=r"sdxl\.safetensors is sdxl, sd1\.safetensors is "
                       "sd1"):
        run_recipe(_recipe(models["sdxl"], models["sd1"], out))
    assert not out.exists()


def _recipe(a: Path, b: Path, out: Path, extra: str = "", method: str = "weighted_sum",
            params: str = "{alpha: 0.5}") -> object:
    text = f"""
version: 1
inputs: {{a: {a}, b: {b}}}
steps:
  s: {{method: {method}, models: [a, b], params: {params}}}
output: {{path: {out}}}
{extra}
"""
    return parse_recipe(text, "test.yaml")


def test_inpaint_rules(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "inp.safetensors"
    run_recipe(_recipe(models["sd1_inpaint"], models["sd1"], out, params="{alpha: 1.0}"))
    m, a, b = load_file(out), load_file(models["sd1_inpaint"]), load_file(models["sd1"])
    key = UNET + "input_blocks.0.0.weight"
    assert m[key].shape == (16, 9, 3, 3)
    assert torch.equal(m[key][:, :4], b[key]) and torch.equal(m[key][:, 4:], a[key][:, 4:])
    with pytest.raises(ModelkitError, match="put the inpainting/pix2pix model first"):
        run_recipe(_recipe(models["sd1"], models["sd1_inpaint"], tmp_path / "bad.safetensors"))


def test_missing_key_policies(tmp_path: Path, models: dict[str, Path]) -> None:
    partial = tmp_path / "partial.safetensors"
    t.write_checkpoint(partial, "sd1", seed=9, components=["unet", "te"])  # no VAE
    out = tmp_path / "o.safetensors"
    with pytest.raises(ModelkitError, match=r"first_stage_model\..* is missing from b"):
        run_recipe(_recipe(models["sd1"], partial, out))
    run_recipe(_recipe(models["sd1"], partial, out, "options: {missing_keys: take-first}"))
    got, a = load_file(out), load_file(models["sd1"])
    _same(got, a, ["first_stage_model.decoder.conv_out.weight"])
    run_recipe(_recipe(models["sd1"], partial, out, "options: {missing_keys: skip}"),
               overwrite=True)  # the output of the run above is replaced
    assert not any(k.startswith("first_stage_model.") for k in load_file(out))


def test_shape_mismatch_named_per_key(tmp_path: Path, models: dict[str, Path]) -> None:
    from modelkit.arch.keys import checkpoint_keys

    keys = checkpoint_keys(t.arch_spec("sd1"))
    bad_key = UNET + "out.2.weight"
    keys[bad_key] = (4, 16, 1, 1)
    odd = tmp_path / "odd.safetensors"
    t.write_tensors(odd, keys)
    with pytest.raises(ModelkitError, match=r"out\.2\.weight: shapes differ"):
        run_recipe(_recipe(models["sd1"], odd, tmp_path / "o.safetensors"))


def test_include_exclude_and_vae_bake(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "inc.safetensors"
    assert _merge(str(models["sd1"]), str(models["sd1_b"]), "-o", str(out), "--alpha", "1",
                  "--include", "unet", "--exclude-key", r"\.out\.2\.", "--vae",
                  str(models["vae"])) == 0
    m, a, b, v = (load_file(p) for p in (out, models["sd1"], models["sd1_b"], models["vae"]))
    _same(m, b, [UNET + "input_blocks.1.0.in_layers.2.weight"])
    _same(m, a, [UNET + "out.2.weight", "cond_stage_model.transformer.text_model."
                 "final_layer_norm.weight"])
    assert torch.equal(m["first_stage_model.decoder.conv_out.weight"],
                       v["decoder.conv_out.weight"])
    with pytest.raises(ModelkitError, match="wrong VAE"):
        bad_vae = tmp_path / "vae16.safetensors"
        from modelkit.arch.keys import vae_keys

        t.write_tensors(bad_vae, dict(vae_keys(t.arch_spec("sd1").vae.__class__(
            ch=16, z_channels=16, embed_dim=16))))
        run_recipe(_recipe(models["sd1"], models["sd1_b"], tmp_path / "z.safetensors",
                           f"options: {{vae: {bad_vae}}}"))


def test_missing_alpha_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                models: dict[str, Path]) -> None:
    # a recipe must give alpha; the merge command uses A1111's default, 0.3
    with pytest.raises(RecipeError, match="missing parameter 'alpha'"):
        run_recipe(_recipe(models["sd1"], models["sd1_b"], tmp_path / "r.safetensors",
                           params="{}"))
    out = tmp_path / "o.safetensors"
    assert _merge(str(models["sd1"]), str(models["sd1_b"]), "-o", str(out)) == 0
    m, a, b = load_file(out), load_file(models["sd1"]), load_file(models["sd1_b"])
    key = UNET + "out.2.weight"
    assert torch.equal(m[key], torch.lerp(a[key].float(), b[key].float(), 0.3).half())
    assert json.loads(read_header(out).metadata["sd_merge_recipe"])["multiplier"] == 0.3


def test_output_onto_input_refused(models: dict[str, Path]) -> None:
    before = models["sd1_b"].read_bytes()
    assert _merge(str(models["sd1"]), str(models["sd1_b"]), "-o", str(models["sd1_b"]),
                  "--alpha", "0.5") == 2
    assert models["sd1_b"].read_bytes() == before


@pytest.mark.parametrize(("body", "message"), [
    ("steps: {s: {method: weighted_summ, models: [a, b]}}", "did you mean"),
    ("steps: {s: {method: weighted_sum, models: [a, b], params: {alpah: 0.5}}}", "alpah"),
    ("steps: {s: {method: weighted_sum, models: [a, zz], params: {alpha: 0.5}}}",
     "unknown input or step 'zz'"),
    ("steps: {s: {method: weighted_sum, models: [a, t], params: {alpha: 0.5}},"
     " t: {method: weighted_sum, models: [s, b], params: {alpha: 0.5}}}", "cycle"),
    ("steps: {s: {method: weighted_sum, models: [a, b], params: {alpha: '0,1,0'}}}",
     "26"),
    ("steps: {s: {method: add_difference, models: [a, b], params: {alpha: 1}}}",
     "takes 3 models"),
])
def test_invalid_recipes_fail_before_reading(tmp_path: Path, models: dict[str, Path],
                                             body: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"version: 1\ninputs: {{a: {models['sd1']}, b: {models['sd1_b']}}}\n"
                    f"{body}\noutput: {{path: {tmp_path / 'o.safetensors'}}}\n")
    with pytest.raises(RecipeError, match=message) as err:
        run_recipe(load_recipe(path))
    assert "r.yaml" in str(err.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_recipe_errors_name_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\ninputs:\n  a: x.safetensors\nsteps:\n  s:\n"
                    "    method: weighted_sum\n    models: [a, b]\n")
    with pytest.raises(RecipeError, match=r"steps\.s\.models\.1 \(line 7\): unknown input"):
        load_recipe(path)
    path.write_text("version: 2\n")
    with pytest.raises(RecipeError, match="version"):
        load_recipe(path)


def test_multistep_recipe_lock_show_replay(tmp_path: Path, models: dict[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""version: 1
inputs:
  base: {models['sd1']}
  style: {models['sd1_b']}
  other: {models['sd1_ema']}
steps:
  mix: {{method: weighted_sum, models: [base, style], params: {{alpha: 0.4}}}}
  final:
    method: add_difference
    models: [mix, other, base]
    params: {{alpha: {{blocks: {{IN: 0.2, default: 0.6}}}}}}
  tie: {{method: ties, models: [base, mix, other], params: {{k: 0.5, dare_p: 0.3}}}}
output: {{path: out.safetensors, step: final}}
""")
    assert main(["recipe", "run", str(recipe), "-q"]) == 0
    out = tmp_path / "out.safetensors"
    assert out.exists()
    assert main(["recipe", "lock", str(recipe), "-q"]) == 0
    locked = load_recipe(tmp_path / "r.lock.yaml")
    assert all(s.sha256 and len(s.sha256) == 64 for s in locked.inputs.values())
    capsys.readouterr()
    assert main(["recipe", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "add_difference" in shown and "sha256" in shown
    assert main(["recipe", "replay", "--check", str(out), "-q"]) == 0
    assert "bit-exact" in capsys.readouterr().out
    # a seeded DARE/TIES step replays exactly too
    out2 = tmp_path / "ties.safetensors"
    out2.write_bytes(b"an older output")  # replaced: --overwrite below
    text = recipe.read_text().replace("step: final", "step: tie")
    recipe.write_text(text)
    assert main(["recipe", "run", str(recipe), "-o", str(out2), "-q", "--overwrite"]) == 0
    assert main(["recipe", "replay", "--check", str(out2), "-q"]) == 0
    meta = read_header(out).metadata
    lineage = json.loads(meta["sd_merge_models"])
    assert len(lineage) == 3


def test_lineage_is_inherited(tmp_path: Path, models: dict[str, Path]) -> None:
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    assert _merge(str(models["sd1"]), str(models["sd1_b"]), "-o", str(first),
                  "--alpha", "0.5") == 0
    assert _merge(str(first), str(models["sd1_ema"]), "-o", str(second), "--alpha",
                  "0.5") == 0
    lineage = json.loads(read_header(second).metadata["sd_merge_models"])
    assert len(lineage) == 4  # first, ema input, and first's two parents


def test_dry_run_reads_no_tensor(tmp_path: Path, models: dict[str, Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dry.safetensors"
    assert main(["merge", str(models["sdxl"]), str(models["sdxl_vpred"]), "-o", str(out),
                 "--alpha", "0.5", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and report["n_merged"] > 2000
    assert report["peak_estimate_bytes"] > 0
    assert not out.exists()


def test_evaluator_frees_chunks_without_gc(tmp_path: Path, models: dict[str, Path]) -> None:
    """Per-key buffers must die when the key is done, not when the cyclic GC
    runs (a reference cycle once held hundreds of MB on SD1.5)."""
    import gc
    import weakref

    from modelkit.io.reader import open_model
    from modelkit.merge.evaluate import Evaluator as _Evaluator
    from modelkit.merge.plan import MergeGroupSpec, make_plan

    recipe = parse_recipe(f"""version: 1
inputs: {{a: {models['sd1']}, b: {models['sd1_b']}, c: {models['sd1_ema']}}}
steps:
  s: {{method: weighted_sum, models: [a, b], params: {{alpha: 0.3}}}}
  t: {{method: add_difference, models: [s, c, a], params: {{alpha: 0.5}}}}
output: {{path: {tmp_path / 'o.safetensors'}}}
""")
    sources = {n: open_model(recipe.resolve(s.path)) for n, s in recipe.inputs.items()}
    plan = make_plan(MergeGroupSpec(recipe.output_step, sources, recipe.steps))
    ev = _Evaluator(plan, sources, "cpu")
    key = UNET + "input_blocks.1.0.in_layers.2.weight"
    refs: list[weakref.ref] = []

    def leaf(name: str) -> torch.Tensor:
        t = sources[name].get(key).float()
        refs.append(weakref.ref(t))
        return t

    gc.disable()
    try:
        out = ev.run(key, leaf)
        assert out.shape == (16, 16, 3, 3)
        del out
        assert len(refs) == 3 and all(r() is None for r in refs)
    finally:
        gc.enable()


def test_the_planner_gets_its_merge_group_not_a_recipe(
        tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge planner takes a narrow spec: the group's leaves as the
    sources the graph opened (an earlier operation's among them), its steps
    and options; no rebuilt recipe whose input paths hold labels (issue 18)."""
    import modelkit.merge.plan as merge_plan
    from modelkit.core.recipe import Recipe
    from modelkit.engine.runner import run

    groups: list[merge_plan.MergeGroupSpec] = []
    real = merge_plan.make_plan
    monkeypatch.setattr(merge_plan, "make_plan", lambda g: groups.append(g) or real(g))
    recipe = Recipe.op("prune", models["sd1_ema"]).then("weighted_sum", models["sd1_b"],
                                                        name="mix", alpha=0.25)
    report = run(recipe, output=tmp_path / "o.safetensors")
    assert len(groups) == 1
    group = groups[0]
    assert group.name == "mix" and list(group.steps) == ["mix"]
    assert list(group.inputs) == ["prune", "mix_in1"] and group.primary == "prune"
    assert group.steps["mix"].params == {"alpha": 0.25} and group.vae is None
    assert not hasattr(group, "base_dir") and not hasattr(group, "output_path")
    assert [s.name for s in report.steps] == ["prune", "mix"]
