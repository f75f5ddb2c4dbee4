"""The one engine: the registry's contracts, one provenance, the layering,
cancel, typed progress, object recipes and the overwrite policy."""

from __future__ import annotations

import ast
import functools
import itertools
import json
import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from modelkit import testing as t
from modelkit.cli import main
from modelkit.core.recipe import Recipe, RecipeError, parse_recipe, validate
from modelkit.core.registry import (
    DROPPED,
    METHOD,
    NEW,
    RENAMED,
    SAME,
    Transform,
    all_transforms,
)
from modelkit.engine.graph import Graph
from modelkit.engine.runner import run
from modelkit.errors import Cancelled, ModelkitError, OutputError
from modelkit.io.header import read_header
from modelkit.io.reader import open_model
from modelkit.progress import PHASES, WRITE, Progress

# --- the registry's contracts ---------------------------------------------------

# every registered transform needs an example here: (fixture names, params)
EXAMPLES: dict[str, tuple[tuple[str, ...], dict]] = {
    "weighted_sum": (("sd1", "sd1_b"), {"alpha": 0.3}),
    "add_difference": (("sd1", "sd1_b", "sd1_ema"), {"alpha": 0.7}),
    "triple_sum": (("sd1", "sd1_b", "sd1_ema"), {"alpha": 0.2, "beta": 0.3}),
    "sum_twice": (("sd1", "sd1_b", "sd1_ema"), {"alpha": 0.2, "beta": 0.3}),
    "slerp": (("sd1", "sd1_b"), {"alpha": 0.4}),
    "train_difference": (("sd1", "sd1_b", "sd1_ema"), {"alpha": 0.5}),
    "ties": (("sd1", "sd1_b", "sd1_ema"), {"k": 0.5, "dare_p": 0.3}),
    "model_stock": (("sd1", "sd1_b", "sd1_ema"), {}),
    "prune": (("sd1_ema",), {}),
    "ema": (("sd1_ema",), {}),
    "quantize": (("sd1",), {"dtype": "int8"}),
    "dequantize": (("sd1_int8",), {"dtype": "fp32"}),
    "swap": (("sd1", "vae"), {"component": "vae"}),
    "extract": (("sdxl",), {"component": "te2"}),
    "convert": (("sd1",), {}),
    "layout": (("flux_aio",), {"to": "diffusers"}),
    "lora_bake": (("sd1", "lora_sd1", "lora_sd1"), {"weights": [0.7, 0.4]}),
    "lora_extract": (("sd1", "sd1_b"), {"rank": 4}),
    "lora_resize": (("lora_sd1",), {"rank": 2}),
    "lora_merge": (("lora_sd1", "lora_sd1"), {"rank": 4, "weights": [0.5, 0.25]}),
    "lora_convert": (("lora_sd1",), {"to": "peft"}),
}
# transforms whose job is to turn integer storage back into floats
DECODES_INTEGERS = {"dequantize"}


@pytest.fixture(scope="module")
def inputs(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, Path]:
    from modelkit.testing.lora import write_lora

    out = dict(models)
    root = tmp_path_factory.mktemp("engine")
    int8 = root / "sd1_int8.safetensors"
    run(Recipe.op("quantize", models["sd1"], output=int8, dtype="int8"))
    out["sd1_int8"] = int8
    out["lora_sd1"] = root / "lora_sd1.safetensors"
    write_lora(out["lora_sd1"], "sd1", seed=3)
    out["flux_aio"] = root / "flux_aio.safetensors"
    t.write_flux(out["flux_aio"], "schnell", hidden=128, depth=1, single=1, all_in_one=True)
    return out


def test_every_transform_has_an_example_and_a_declaration() -> None:
    registered = all_transforms()
    assert set(EXAMPLES) == set(registered)
    for tr in registered.values():
        assert tr.summary and tr.keys <= {SAME, RENAMED, NEW, DROPPED}
        assert tr.accepts(len(EXAMPLES[tr.name][0])), tr.name


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1).view(torch.uint8)


def _planned(tr: Transform, paths: list[Path], params: dict, stack: ExitStack
             ) -> tuple[Graph, object]:
    recipe = Recipe.op(tr.name, *paths, output="unused.safetensors", **params) \
        if tr.kind != METHOD else Recipe.merge(*paths, method=tr.name, output="x.safetensors",
                                               dtype="keep", **params)
    graph = Graph(validate(recipe), stack, "cpu")
    return graph, graph.build()


def _check_keys(tr: Transform, graph: Graph, final: object) -> set[str]:
    """Observed key relations; shapes and non-float tensors checked."""
    step = next(iter(graph.recipe.steps.values()))
    sources = [graph.node(m) for m in step.models]
    if tr.kind == METHOD:  # the merge planner maps the primary's keys to themselves
        origins = {k: (0, k) for k in final.infos}
    else:
        origins = graph.records[-1].planned.origins
    assert set(origins) == set(final.infos), tr.name
    observed: set[str] = set()
    for key, origin in origins.items():
        if origin is None:
            observed.add(NEW)
            continue
        i, src_key = origin
        observed.add(SAME if src_key == key else RENAMED)
        src_info = sources[i].infos[src_key]
        assert final.infos[key].shape == src_info.shape, (tr.name, key)
        if not src_info.is_float and tr.name not in DECODES_INTEGERS:
            assert final.infos[key].dtype == src_info.dtype, (tr.name, key)
            assert torch.equal(_bits(final.get(key)), _bits(sources[i].get(src_key))), key
    used = {o for o in origins.values() if o is not None}
    if any((i, k) not in used for i, s in enumerate(sources) for k in s.infos):
        observed.add(DROPPED)
    return observed


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_transform_contract(name: str, inputs: dict[str, Path]) -> None:
    """The declared key relations hold, shapes are preserved, non-float
    tensors are untouched, and every output tensor can be computed."""
    tr = all_transforms()[name]
    fixture_names, params = EXAMPLES[name]
    with ExitStack() as stack:
        graph, final = _planned(tr, [inputs[n] for n in fixture_names], params, stack)
        for planned in graph.planned_steps:
            if planned.prepare is not None:
                planned.prepare(lambda _: None, None)
        observed = _check_keys(tr, graph, final)
        assert observed <= tr.keys, (name, observed - tr.keys)
        for key in list(final.infos)[::97]:  # a sample: every tensor is tested elsewhere
            assert tuple(final.get(key).shape) == final.infos[key].shape


def _random(n: int, shape: tuple[int, ...] = (5, 7)) -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(40 + i))
            for i in range(n)]


@pytest.mark.parametrize("name", sorted(n for n, tr in all_transforms().items() if tr.ends))
def test_exact_ends(name: str, inputs: dict[str, Path]) -> None:
    """At a declared end the result *is* one of the inputs, bit for bit."""
    tr = all_transforms()[name]
    fixture_names, example = EXAMPLES[name]
    for end, index in tr.ends:
        params = {**example, **dict(end)}
        if tr.kind == METHOD:
            tensors = _random(len(fixture_names))
            out = tr.apply(tensors, params, torch.Generator().manual_seed(0))
            assert torch.equal(_bits(out), _bits(tensors[index])), (name, end)
            continue
        with ExitStack() as stack:
            graph, final = _planned(tr, [inputs[n] for n in fixture_names], params, stack)
            src = graph.node(next(iter(graph.recipe.steps.values())).models[index])
            for key in final.infos:
                assert torch.equal(_bits(final.get(key)), _bits(src.get(key))), key


# --- one provenance ----------------------------------------------------------------


def test_trailing_prune_changes_metadata_by_one_history_entry(
        models: dict[str, Path], tmp_path: Path) -> None:
    base = Recipe.merge(models["sd1"], models["sd1_b"], alpha=0.4)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    plain, pruned = tmp_path / "a" / "out.safetensors", tmp_path / "b" / "out.safetensors"
    run(base, output=plain)
    run(base.then("prune"), output=pruned)
    a, b = read_header(plain).metadata, read_header(pruned).metadata
    assert set(a) == set(b) and "sd_merge_recipe" in a and "sd_merge_models" in a
    assert {k for k in a if a[k] != b[k]} == {"modelkit.history", "modelkit.recipe"}
    ha, hb = json.loads(a["modelkit.history"]), json.loads(b["modelkit.history"])
    assert hb[:-1] == ha and hb[-1]["op"] == "prune" and len(ha) == 1
    # the recipes differ by the prune step alone
    ra, rb = parse_recipe(a["modelkit.recipe"]), parse_recipe(b["modelkit.recipe"])
    assert list(rb.steps) == [*ra.steps, "prune"] and rb.output_step == "prune"
    assert rb.inputs == ra.inputs and rb.steps["merge"] == ra.steps["merge"]
    # shared outputs name files, never folders
    assert str(tmp_path) not in json.dumps(b) and str(models["sd1"].parent) not in b[
        "modelkit.recipe"]


def test_block_params_and_the_primary_input_have_one_form(
        models: dict[str, Path], tmp_path: Path) -> None:
    """A block-wise parameter is written the same way in the recipe, the
    history and A1111's lineage; the primary input is one method (issue 18)."""
    from modelkit.core.recipe import BlockParam, yaml_params

    assert yaml_params({"alpha": BlockParam(preset="in_only"), "w": (0.5, 1)}) == {
        "alpha": {"preset": "in_only"}, "w": [0.5, 1]}
    recipe = Recipe.merge(models["sd1"], models["sd1_b"], models["sd1_ema"],
                          method="add_difference", alpha={"preset": "in_only"}).then("prune")
    assert recipe.primary_input() == "a" and recipe.primary_input("merge") == "a"
    assert recipe.primary_input("c") == "c"
    out = tmp_path / "blocks.safetensors"
    run(recipe, output=out)
    meta = read_header(out).metadata
    written = parse_recipe(meta["modelkit.recipe"]).to_dict()["steps"]["merge"]["params"]
    history = json.loads(meta["modelkit.history"])
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert written["alpha"] == history[0]["params"]["alpha"] == a1111["multiplier"] == {
        "preset": "in_only"}
    assert history[0]["op"] == "add_difference" and history[-1]["op"] == "prune"


def test_every_format_gets_the_provenance(models: dict[str, Path], tmp_path: Path) -> None:
    from modelkit.io.open import open_source

    recipe = Recipe.merge(models["sd1"], models["sd1_b"], alpha=0.5)
    for out in (tmp_path / "m.safetensors", tmp_path / "m.gguf", tmp_path / "folder"):
        run(recipe, output=out)
        meta = open_source(out).metadata
        assert json.loads(meta["modelkit.history"])[0]["op"] == "weighted_sum", out
        merged = json.loads(meta["sd_merge_recipe"])
        assert merged["interp_method"] == "Weighted sum", out
        assert len(merged["primary_model_hash"]) == 64, out
        names = {m["name"] for m in json.loads(meta["sd_merge_models"]).values()}
        assert names == {"sd1.safetensors", "sd1_b.safetensors"}, out


# --- layering ----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1] / "modelkit"
# layer of each module (longest prefix wins); a module imports its own layer or lower
LAYERS = {
    "modelkit": 0, "modelkit.errors": 0, "modelkit.progress": 0, "modelkit.numeric": 0,
    "modelkit.textsafe": 0, "modelkit.vocab": 0, "modelkit.arch": 0, "modelkit.wording": 0,
    "modelkit.io": 1, "modelkit.testing": 1,
    "modelkit.inspect": 2,
    # the registry, recipes, steps, key regexes, and verify's settings (plain
    # data and parsing; recipe validation reads their one declaration of the
    # verify: fields) with the tables they check against
    "modelkit.core": 3,
    "modelkit.merge": 4, "modelkit.convert": 4, "modelkit.lora": 4, "modelkit.verify": 4,
    "modelkit.library": 4,
    "modelkit.engine": 5, "modelkit.sweep": 5,
    "modelkit.demo": 6,
    "modelkit.cli": 7, "modelkit.tui": 7, "modelkit.__main__": 7,
    "modelkit.fuzz": 7,  # header fuzzing: drives the CLI like a user
}
FRONT_ENDS = ("modelkit.cli", "modelkit.tui", "modelkit.__main__")


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


@functools.cache
def _imports(path: Path) -> frozenset[str]:
    """What a module imports: import statements (function-level ones too)
    and modules named by a string (see :func:`_string_imports`)."""
    tree = ast.parse(path.read_text())
    out = _string_imports(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names
                    if node.module == "modelkit"}
    return frozenset(out)


def _string_imports(tree: ast.AST) -> set[str]:
    """Modules imported by name: any string constant that names one of
    modelkit's modules (``importlib.import_module("modelkit.x")``, tables of
    module names such as the registry's ``BUILTIN_MODULES``, the package's
    ``_EXPORTS``, the CLI's command table, ``sys.modules.get(...)``)."""
    known = set(_modules()) - {"modelkit"}  # "modelkit" is also the program's name
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in known}


@functools.cache
def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _string_hooks() -> dict[str, tuple[set[str], str]]:
    """Imports by name that go up a layer by design: importer -> (the
    modules its table names, why)."""
    import modelkit
    from modelkit.core import registry

    return {
        "modelkit": (set(modelkit._EXPORTS.values()),
                     "the package's lazy public API: 'from modelkit import run' imports "
                     "the module only when the name is used (PEP 562 __getattr__)"),
        "modelkit.core.registry": (set(registry.BUILTIN_MODULES),
                                   "a registration hook: the built-in transforms register "
                                   "themselves when the registry is first asked"),
    }


def test_no_module_imports_one_above_it() -> None:
    problems = []
    hooks = _string_hooks()
    for name, path in _modules().items():
        allowed = hooks.get(name, (set(), ""))[0]
        for imported in _imports(path) - allowed:
            if imported == "modelkit" or not imported.startswith("modelkit."):
                continue
            if _layer(imported) > _layer(name):
                problems.append(f"{name} (layer {_layer(name)}) imports {imported} "
                                f"(layer {_layer(imported)})")
    assert not problems, "\n".join(problems)


def _folder(module: str) -> str:
    """The folder-level node of a module: its sub-package of modelkit/
    (``modelkit.core.recipe`` -> ``core``), or the module itself for the
    files directly in modelkit/ (``modelkit.errors`` -> ``errors``)."""
    return module.split(".")[1] if module.count(".") else module


def _folder_graph() -> dict[str, dict[str, set[str]]]:
    """Folder -> folder it imports -> the module-level imports behind the
    edge; every import counts as in the layering test (function-level ones
    and modules named by strings), except the declared hooks."""
    hooks = _string_hooks()
    graph: dict[str, dict[str, set[str]]] = {}
    for name, path in _modules().items():
        if name == "modelkit":
            continue  # the package root: its only imports are the lazy _EXPORTS hook
        allowed = hooks.get(name, (set(), ""))[0]
        src = _folder(name)
        edges = graph.setdefault(src, {})
        for imported in _imports(path) - allowed:
            if not imported.startswith("modelkit.") or imported not in _modules():
                imported = ".".join(imported.split(".")[:-1])  # from modelkit.x import name
            if not imported.startswith("modelkit."):
                continue
            dst = _folder(imported)
            if dst != src:
                edges.setdefault(dst, set()).add(f"{name} -> {imported}")
    return graph


def _find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    """One cycle of the graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_folder_level_import_cycle() -> None:
    """The folders show the layers (issue 18): no sub-package of modelkit/
    imports, even in a function, one that imports it back, directly or
    through others (core/ holds layer 3, engine/ layer 5)."""
    graph = _folder_graph()
    assert {"core", "engine", "merge", "convert", "inspect", "io", "cli"} <= set(graph)
    assert "core" in graph["merge"] and "merge" in graph["engine"]  # the edges were seen
    assert "engine" not in graph["core"] and "convert" not in graph["core"]
    cycle = _find_cycle(graph) or []
    why = sorted(m for a, b in itertools.pairwise(cycle) for m in graph[a][b])
    assert not cycle, " -> ".join(cycle) + "\n" + "\n".join(why)


def test_the_cycle_finder_finds_cycles() -> None:
    assert _find_cycle({"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}}) \
        == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": set()}, "b": {}, "c": {"a": set(), "b": set()}}) is None


def test_string_imports_are_seen_and_hooks_declared() -> None:
    """Modules named by strings count as imports (issue 18), and each declared
    hook names exactly what its module's table holds."""
    registry = _modules()["modelkit.core.registry"]
    assert {"modelkit.merge.methods", "modelkit.lora.transforms"} <= _imports(registry)
    assert "modelkit.engine.runner" in _imports(_modules()["modelkit"])
    assert "modelkit.cli.merge_cmd" in _imports(_modules()["modelkit.cli"])
    assert "modelkit.recipe" not in _imports(_modules()["modelkit.library.metadata"])  # a key
    for name, (table, reason) in _string_hooks().items():
        above = {m for m in _string_imports(ast.parse(_modules()[name].read_text()))
                 if _layer(m) > _layer(name)}
        assert above and above <= table and reason, name


def test_the_tui_never_imports_the_cli() -> None:
    """Both front ends share layer-0 wording (modelkit.wording), not each other."""
    found = {name: sorted(m for m in _imports(path) if m == "modelkit.cli"
                          or m.startswith("modelkit.cli."))
             for name, path in _modules().items() if name.startswith("modelkit.tui")}
    assert len(found) > 10  # the TUI's modules were all seen
    assert not {name: m for name, m in found.items() if m}


def test_the_core_never_imports_click_or_textual() -> None:
    for name, path in _modules().items():
        if name.startswith(FRONT_ENDS):
            continue
        roots = {m.split(".")[0] for m in _imports(path)}
        assert not roots & {"click", "textual", "rich"}, name


def test_io_imports_nothing_above_it() -> None:
    for name, path in _modules().items():
        if name.startswith("modelkit.io"):
            above = {m for m in _imports(path) if m.startswith(
                ("modelkit.inspect", "modelkit.merge", "modelkit.convert", "modelkit.cli",
                 "modelkit.tui", "modelkit.core", "modelkit.engine"))}
            assert not above, (name, above)


# --- cancel, progress, overwrite ----------------------------------------------------------


def test_cancel_from_another_thread_mid_write(models: dict[str, Path], tmp_path: Path) -> None:
    cancel, writing = threading.Event(), threading.Event()
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.phase == WRITE and p.done < p.total:
            writing.set()
            cancel.wait(0.5)  # let the other thread cancel while tensors remain

    def canceller() -> None:
        writing.wait(30)
        cancel.set()

    thread = threading.Thread(target=canceller)
    thread.start()
    out = tmp_path / "cancelled.safetensors"
    with pytest.raises(Cancelled):
        run(Recipe.merge(models["sd1"], models["sd1_b"], alpha=0.5), output=out,
            progress=progress, cancel=cancel)
    thread.join()
    assert list(tmp_path.iterdir()) == []  # no output, no temp file
    written = [p for p in seen if p.phase == WRITE]
    assert written and written[-1].done < written[-1].total


def test_progress_events_are_typed_and_serialised(models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    inside, events = threading.Lock(), []

    def progress(p: Progress) -> None:
        assert inside.acquire(blocking=False), "two events at once"
        try:
            events.append(p)
        finally:
            inside.release()

    sd1 = tmp_path / "fresh.safetensors"  # not in the hash cache: hashed beside the write
    t.write_checkpoint(sd1, "sd1", seed=77)
    run(Recipe.merge(sd1, models["sd1_b"], alpha=0.5).then("prune"),
        output=tmp_path / "o.safetensors", progress=progress)
    assert {p.phase for p in events} <= set(PHASES)
    assert {"plan", "write", "hash"} <= {p.phase for p in events}
    overall = [p.overall for p in events if p.phase in ("write", "hash")]
    assert all(0 <= x <= 1 for x in overall) and overall[-1] == pytest.approx(1.0)
    writes = [p for p in events if p.phase == WRITE]
    assert writes[-1].done == writes[-1].total and writes[0].step == "prune"


def test_a_run_opens_each_input_once(models: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One 'open inputs' plan event per input, one open_source call per file,
    and one output check, all before any tensor is read (issue 18)."""
    import modelkit.io.open as io_open
    import modelkit.io.write as io_write

    opened: list[str] = []
    checks: list[Path] = []
    real_open, real_check = io_open.open_source, io_write.check_output
    monkeypatch.setattr(io_open, "open_source",
                        lambda path, *a, **k: opened.append(Path(path).name)
                        or real_open(path, *a, **k))
    monkeypatch.setattr(io_write, "check_output",
                        lambda spec, inputs: checks.append(spec.path) or real_check(spec, inputs))
    events: list[Progress] = []
    out = tmp_path / "once.safetensors"
    run(Recipe.merge(models["sd1"], models["sd1_b"], models["sd1_ema"], method="add_difference",
                     alpha=0.5).then("prune"), output=out, progress=events.append)
    opens = [(p.item, p.done, p.total) for p in events if p.step == "open inputs"]
    assert [(d, n) for _, d, n in opens] == [(1, 3), (2, 3), (3, 3)]
    assert len({item for item, _, _ in opens}) == 3
    assert sorted(opened) == ["sd1.safetensors", "sd1_b.safetensors", "sd1_ema.safetensors"]
    assert checks == [out]
    # a VAE to bake in is opened once too (not read again by the merge planner)
    import modelkit.io.reader as io_reader
    from modelkit.core.recipe import Options

    read = io_reader.read_infos
    monkeypatch.setattr(io_reader, "read_infos",
                        lambda path, *a, **k: opened.append(Path(path).name)
                        or read(path, *a, **k))
    opened.clear()
    run(Recipe.merge(models["sd1"], models["sd1_b"], alpha=0.5,
                     options=Options(vae=str(models["vae"]))),
        output=tmp_path / "vae.safetensors")
    assert opened.count(models["vae"].name) == 1


def test_overwrite_policy_is_the_same_for_every_command(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"user data")
    args = ["merge", str(models["sd1"]), str(models["sd1_b"]), "-o", str(out), "--alpha",
            "0.5", "-q"]
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"user data"
    assert main(["prune", str(models["sd1"]), "-o", str(out), "-q"]) == 2
    assert out.read_bytes() == b"user data"
    assert main([*args, "--overwrite"]) == 0
    assert read_header(out).tensors
    # an input is never a target, even with --overwrite
    before = models["sd1_b"].read_bytes()
    assert main(["merge", str(models["sd1"]), str(models["sd1_b"]), "-o",
                 str(models["sd1_b"]), "--alpha", "0.5", "--overwrite", "-q"]) == 2
    assert models["sd1_b"].read_bytes() == before


def test_commit_never_replaces_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    from modelkit.io.writer import SafetensorsWriter, TensorSpec

    out = tmp_path / "race.safetensors"
    writer = SafetensorsWriter(out, [TensorSpec("w", "F32", (2,))], overwrite=False)
    writer.write("w", torch.ones(2))
    out.write_bytes(b"the other run's file")  # another process committed first
    with pytest.raises(OutputError, match="already exists"):
        writer.commit()
    assert out.read_bytes() == b"the other run's file"
    assert [p.name for p in tmp_path.iterdir()] == ["race.safetensors"]


# --- recipes built in code ------------------------------------------------------------


@pytest.mark.parametrize(("build", "message"), [
    (lambda m: Recipe.merge(m["sd1"], m["sd1_b"], method="weighted_summ", alpha=0.5),
     "did you mean 'weighted_sum'"),
    (lambda m: Recipe.merge(m["sd1"], m["sd1_b"]), "missing parameter 'alpha'"),
    (lambda m: Recipe.merge(m["sd1"], m["sd1_b"], alpha="no_such_preset"),
     "unknown block preset"),
    (lambda m: Recipe.merge(m["sd1"], m["sd1_b"], m["sd1"], alpha=0.5), "takes 2 models"),
    (lambda m: Recipe.op("prune", m["sd1"], keep_ema="yes"), "'keep_ema' must be true or"),
    (lambda m: Recipe.op("quantize", m["sd1"], dtype="fp4"), "'fp4' is not one of"),
    (lambda m: Recipe.merge(m["sd1"], m["sd1_b"], alpha=0.5).then("shrink"),
     "unknown method or operation 'shrink'"),
])
def test_recipes_built_in_code_are_validated_like_yaml(models: dict[str, Path], build: object,
                                                       message: str, tmp_path: Path) -> None:
    recipe = build(models).with_output(tmp_path / "o.safetensors")  # type: ignore[operator]
    with pytest.raises(RecipeError, match=message):
        validate(recipe)
    with pytest.raises(RecipeError, match=message):
        run(recipe)
    assert not list(tmp_path.iterdir())


def test_code_and_yaml_recipes_give_the_same_file(models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    yaml_recipe = parse_recipe(f"""version: 1
inputs: {{a: {models['sd1']}, b: {models['sd1_b']}}}
steps:
  merge: {{method: weighted_sum, models: [a, b], params: {{alpha: {{preset: in_only}}}}}}
  prune: {{op: prune, models: [merge]}}
""")
    code_recipe = Recipe.merge(models["sd1"], models["sd1_b"], alpha="in_only").then("prune")
    run(yaml_recipe, output=tmp_path / "y.safetensors")
    run(code_recipe, output=tmp_path / "c.safetensors")
    with open_model(tmp_path / "y.safetensors") as y, open_model(tmp_path / "c.safetensors") as c:
        assert list(y.infos) == list(c.infos)
        assert all(torch.equal(_bits(y.get(k)), _bits(c.get(k))) for k in y.infos)


def test_a_lora_cannot_be_merged_and_is_refused_by_role(tmp_path: Path,
                                                        models: dict[str, Path]) -> None:
    from modelkit.testing.lora import write_lora

    lora = tmp_path / "l.safetensors"
    write_lora(lora, "sd1")
    with pytest.raises(ModelkitError, match="is a lora, not a checkpoint"):
        run(Recipe.merge(models["sd1"], lora, alpha=0.5), output=tmp_path / "o.safetensors")
    with pytest.raises(ModelkitError, match=r"l\.safetensors: is a lora, not a checkpoint"):
        run(Recipe.op("ema", lora), output=tmp_path / "o.safetensors")


@pytest.mark.parametrize("case", ["weighted_blocks_bf16", "add_difference_vae", "inpaint"])
def test_fast_route_gives_the_general_routes_bytes(case: str, models: dict[str, Path],
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import modelkit.merge.fastpath as fastpath

    m = models
    recipe = {
        "weighted_blocks_bf16": Recipe.merge(m["sd1"], m["sd1_ema"], alpha="gradient_v",
                                             dtype="bf16"),
        "add_difference_vae": Recipe.merge(m["sd1"], m["sd1_b"], m["sd1_ema"],
                                           method="add_difference", alpha=0.7).with_output(
            dtype="keep"),
        "inpaint": Recipe.merge(m["sd1_inpaint"], m["sd1_b"], alpha=0.25),
    }[case]
    if case == "add_difference_vae":
        from dataclasses import replace

        recipe.options = replace(recipe.options, vae=str(m["vae"]))
    fast, slow = tmp_path / "fast.safetensors", tmp_path / "slow.safetensors"
    calls: list[str] = []
    real = fastpath._merge_chunks

    def counted(*args: object) -> None:
        calls.append("merge")
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(fastpath, "_merge_chunks", counted)
    run(recipe, output=fast)
    assert calls  # the fast route ran
    monkeypatch.setattr(fastpath, "streamer", lambda *a: None)
    run(recipe, output=slow)
    assert fast.read_bytes() == slow.read_bytes()
