"""``modelkit methods`` and ``modelkit presets``: what the registry and the
block tables hold, generated from them."""

from __future__ import annotations

import json

import click

from modelkit.arch.registry import block_list_archs
from modelkit.cli.common import common_option

PRESET_ARCHS = block_list_archs()


def block_table(weights: dict[str, float]) -> list[str]:
    """Block weights as rows of ``NAME value`` cells (the TUI's table)."""
    from modelkit.wording import block_rows

    return block_rows(weights, indent="    ")


@click.command("methods")
@common_option("as_json", help="Print the registry as JSON.")
def methods_cmd(as_json: bool) -> None:
    """List every merge method and operation with its inputs, parameters,
    defaults and meaning (methods go in 'method:' steps and 'modelkit merge
    --method'; operations in 'op:' steps)."""
    from modelkit.core.registry import METHOD, all_transforms

    found = all_transforms()
    if as_json:
        click.echo(json.dumps({n: {
            "kind": t.kind, "summary": t.summary, "reference": t.reference,
            "inputs": [{"name": i, "role": r} for i, r in t.inputs], "variadic": t.variadic,
            "models": t.arity(), "seeded": t.seeded, "elementwise": t.elementwise,
            "a1111": t.a1111, "key_relations": sorted(t.keys),
            "params": {p.name: {"kind": p.kind, "default": None if p.required else p.default,
                                "required": p.required, "choices": list(p.choices),
                                "blockwise": p.blockwise, "per_model": p.per_model,
                                "suggested": p.suggested, "help": p.help}
                       for p in t.params.values()}} for n, t in found.items()}, indent=2))
        return
    for kind, title in ((METHOD, "Merge methods (method: in recipes, --method)"),
                        ("op", "Operations (op: in recipes)")):
        click.echo(title)
        for name, t in found.items():
            if t.kind != kind:
                continue
            inputs = ", ".join(f"*{i}" if t.variadic and n == len(t.inputs) - 1 else i
                               for n, (i, _) in enumerate(t.inputs))
            click.echo(f"  {name}({inputs}): {t.summary}")
            for p in t.params.values():
                click.echo(f"      {p.describe()}")
                if p.help:
                    click.echo(f"          {p.help}")
            extra = []
            if t.seeded:
                extra.append("seeded (options.seed)")
            if t.a1111:
                extra.append(f"A1111: {t.a1111}")
            if extra:
                click.echo(f"      {'; '.join(extra)}")
        click.echo("")


@click.command("presets")
@click.option("--arch", type=click.Choice(PRESET_ARCHS), default=None,
              help="Only this architecture's block list (SD2 and the refiner use SD1's).")
@common_option("as_json", help="Print the values as JSON.")
def presets_cmd(arch: str | None, as_json: bool) -> None:
    """List each block list's names and its block-weight presets with their
    values: SD1 and SD2 (26 weights: BASE, IN00..IN11, M00, OUT00..OUT11),
    SDXL (20: BASE, IN00..IN08, M00, OUT00..OUT08), and the transformer
    families with ComfyUI's block-merge names (Flux.1's ModelMergeFlux1,
    SD3's, Qwen-Image's, Wan's; Chroma, Flux.2 and Z-Image by their own
    modules). SD merges take an optional VAE entry last (27 or 21 values),
    which follows BASE unless given. A mapping may name groups: IN, OUT, MID
    for SD; IN, OUT, BLOCKS and each stack (DOUBLE, SINGLE, JOINT...) for the
    others."""
    from modelkit.arch.blocks import count_text, group_text, preset, presets_of

    archs = [arch] if arch else list(PRESET_ARCHS)
    # every preset name once, in order; each lists the block lists that have it
    docs = {n: d for a in archs for n, d in presets_of(a).items()}
    if as_json:
        click.echo(json.dumps({name: {a: preset(name, a) for a in archs
                                      if name in presets_of(a)}
                               for name in docs}, indent=2))
        return
    for a in archs:
        click.echo(f"{a}: {count_text(a)}")
        groups = group_text(a)
        if groups:
            click.echo(f"  groups: {groups}")
    click.echo("")
    for name, doc in docs.items():
        click.echo(f"{name}: {doc}")
        for a in archs:
            if name not in presets_of(a):
                continue
            click.echo(f"  {a}:")
            for row in block_table(preset(name, a)):
                click.echo(row)
