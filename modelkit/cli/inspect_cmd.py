"""``modelkit inspect``."""

from __future__ import annotations

import json

import click

from modelkit.cli.common import common_option
from modelkit.cli.progress import human_bytes
from modelkit.inspect.report import ModelReport, inspect_model
from modelkit.textsafe import shown
from modelkit.wording import param_count, plural

EPILOG = """\b
Examples:
  modelkit inspect models/Stable-diffusion/model.safetensors
  modelkit inspect lora.safetensors --json | jq .adapter
"""


VALUE_LIMIT = 70  # metadata values, evidence and notes are cut to about a line
KEY_LIMIT = 60  # key names and metadata keys
METADATA_SHOWN = 12


def _component_line(c: dict) -> str:
    status = {True: "complete", False: "INCOMPLETE", None: "not checked"}[c["complete"]]
    problems = []
    if c["n_missing"]:
        problems.append(f"{c['n_missing']} missing")
    if c["n_shape_mismatches"]:
        problems.append(f"{c['n_shape_mismatches']} wrong shapes")
    if c["n_unexpected"]:
        problems.append(f"{c['n_unexpected']} unexpected")
    extra = f" ({', '.join(problems)})" if problems else ""
    return (f"    {c['name']:<10} {c['family']:<34} {c['n_tensors']:>5} tensors "
            f"{param_count(c['n_params']):>12}  {status}{extra}")


def _ema(d: dict) -> str:
    if not d["has_ema"]:
        return "no"
    n_keys = d["extra_keys"].get("ema", d["n_ema_tensors"])
    if n_keys == d["n_ema_tensors"]:
        return f"yes, {plural(d['n_ema_tensors'], 'tensor')}"
    return (f"yes, {plural(d['n_ema_tensors'], 'tensor')} ({n_keys} model_ema. keys with decay, "
            "num_updates)")


def _gguf_line(g: dict) -> str:
    types = ", ".join(f"{k} {v}" for k, v in g["quant_types"].items())
    arch = shown(g["architecture"], 20) if g["architecture"] else "not set"
    line = (f"v{g['version']}, general.architecture {arch}, {plural(g['n_tensors'], 'tensor')} "
            f"({types})")
    if g["n_orig_shapes"]:
        line += f", {g['n_orig_shapes']} stored flattened (comfy.gguf.orig_shape)"
    return line


def _quant_line(q: dict) -> str:
    """``Q4_K 412 layers, F32 88`` (tensors per storage, most first)."""
    counts = list(q["counts"].items())
    parts = [f"{shown(k, 40)} {plural(v, 'layer') if i == 0 else v}"
             for i, (k, v) in enumerate(counts[:8])]
    more = f", {len(counts) - 8} more kinds" if len(counts) > 8 else ""
    return f"{q['spelling']}: " + ", ".join(parts) + more


def render(rep: ModelReport) -> str:
    """The human-readable summary. Every string that comes from the file
    (names, metadata, keys) is escaped and cut with :func:`shown`."""
    d = rep.to_dict()
    evidence = "; ".join(shown(e, 160) for e in d["arch_evidence"])
    pred = "; ".join(shown(e, 160) for e in d["prediction"]["evidence"])
    rows = [
        ("kind", d["kind"]),
        ("arch", d["arch"] + (f"  ({evidence})" if evidence else "")),
        ("variant", d["variant"] or "-"),
        ("layout", d["layout"] or "-"),
        ("prediction", f"{d['prediction']['type']}  ({pred})"),
        ("size", f"{human_bytes(d['size_bytes'])}, {plural(d['n_tensors'], 'tensor')}, "
                 f"{param_count(d['n_params'])} params"),
        ("dtypes", ", ".join(f"{k} {v}" for k, v in d["dtypes"].items())),
        ("EMA", _ema(d)),
    ]
    if d["gguf"]:
        rows.append(("gguf", _gguf_line(d["gguf"])))
    if d["quantization"]:
        rows.append(("quantized", _quant_line(d["quantization"])))
    lines = [shown(d["path"])] + [f"  {k:<11} {v}" for k, v in rows]
    if d["components"]:
        lines.append("  components")
        lines += [_component_line(c) for c in d["components"].values()]
    if d["adapter"]:
        a = d["adapter"]
        lines.append(f"  adapter     {a['format']} ({a['naming']} names), "
                     f"{plural(a['n_modules'], 'module')}, rank {a['ranks']}, "
                     f"alpha {a['alphas']}, touches "
                     f"{', '.join(a['targets'])}")
    if d["embedding"]:
        e = d["embedding"]
        lines.append(f"  embedding   {plural(e['vectors'], 'vector')} of width {e['width']}")
    if d["extra_keys"]:
        lines.append("  extra keys  " + ", ".join(f"{k} {v}" for k, v in d["extra_keys"].items()))
    if d["unknown_keys"]:
        lines.append(f"  unknown     {plural(len(d['unknown_keys']), 'key')}, e.g. "
                     f"{shown(d['unknown_keys'][0], KEY_LIMIT)}")
    for note in d["notes"]:
        lines.append(f"  note        {shown(note, 200)}")
    if d["metadata"]:
        lines.append(f"  metadata    {plural(len(d['metadata']), 'entry')}")
        for k, v in list(d["metadata"].items())[:METADATA_SHOWN]:
            lines.append(f"    {shown(k, KEY_LIMIT)}: {shown(v, VALUE_LIMIT)}")
    # a last guard: nothing unescaped reaches the terminal, whatever a line holds
    return "\n".join(shown(line) for line in lines)


@click.command("inspect", epilog=EPILOG)
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False,
                                                                  path_type=str))
@common_option("as_json", help="Print the stable JSON report (schema modelkit.inspect/1): "
                               "an object for one file, a list for several.")
def inspect_cmd(paths: tuple[str, ...], as_json: bool) -> None:
    """Say what model files are, from their headers alone.

    Reports kind, architecture, variant, prediction type with its evidence,
    components and their completeness, EMA, dtypes, adapter details and the
    file's metadata. Several files (a shell glob) are inspected one after
    another; a file that cannot be read gets its one-line error and the
    others are still shown (exit code 2 if any failed).
    """
    from modelkit.errors import ModelkitError
    from modelkit.textsafe import shown

    reports: list[object] = []  # JSON dicts, or the reports drawn so far
    failed = 0
    for path in paths:
        try:
            rep = inspect_model(path)
        except ModelkitError as exc:
            if len(paths) == 1:
                raise
            click.echo(f"modelkit: error: {shown(exc)}", err=True)
            failed += 1
            continue
        if as_json:
            reports.append(rep.to_dict())
        else:
            if reports:
                click.echo("")
            reports.append(rep)
            click.echo(render(rep))
    if as_json:
        click.echo(json.dumps(reports[0] if len(paths) == 1 else reports, indent=2))
    if failed:
        raise click.exceptions.Exit(2)
