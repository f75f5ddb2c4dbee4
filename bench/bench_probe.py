"""Benchmark ``modelkit verify CANDIDATE --reference REF --probe`` on
full-width Flux.1-dev-shaped files: width 3072, 24 heads of 128, CLIP-L and
T5-XXL input widths, the real block names; depth reduced to ``--double``
double and ``--single`` single blocks (19 and 38 at full size) so two files
fit in /dev/shm. The reference is BF16, the candidate the same synthetic
values stored as F16 (a cast: every block must pass).

Each run is a fresh ``modelkit`` process sampled every ~5 ms for its peak
RssAnon (anonymous memory: file pages of the inputs are not counted) and
VmHWM; quiet and then beside one busy process (``--busy``). Timings are
taken on a shared 2-core machine: the load is printed with each row.

Run: ``.venv/bin/python bench/bench_probe.py [--dir /dev/shm/modelkit-probe]
[--double 2 --single 4] [--rounds 2] [--busy]``; ``--check-math`` runs the
probe's Qwen-Image block against diffusers' own on the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_io import busy_loop, child_env, log, machine_load, sample_process


def make_files(d: Path, double: int, single: int) -> tuple[Path, Path]:
    """The BF16 reference and its F16 copy (kept when present)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from modelkit.testing import write_flux

    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for dtype in ("BF16", "F16"):
        p = d / f"flux-w3072-d{double}s{single}-{dtype.lower()}.safetensors"
        if not p.exists():
            log(f"writing {p.name}")
            write_flux(p, hidden=3072, depth=double, single=single, prefixed=True,
                       dtype=dtype, full_text=True)
        paths.append(p)
    return paths[0], paths[1]


def run_once(ref: Path, cand: Path, out: Path) -> dict[str, object]:
    """One probe run in a fresh process."""
    report = out / "probe.json"
    report.unlink(missing_ok=True)
    (out / "probe-probe.png").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "modelkit", "verify", str(cand), "--reference", str(ref),
           "--probe", "--report", str(report), "-q"]
    load, _ = machine_load()
    got = sample_process(cmd, child_env())
    data = json.loads(report.read_text()) if report.exists() else {}
    return {"wall_s": round(got.wall_s, 1), "peak_anon_mb": round(got.peak_anon_kb / 1024),
            "hwm_mb": round(got.hwm_kb / 1024), "rc": got.returncode,
            "verdict": data.get("verdict"), "blocks": len(data.get("probe", [])),
            "probe_s": data.get("timings", {}).get("probe"), "load": load,
            "worst": max((r["rel_error"] for r in data.get("probe", [])), default=None)}


def check_math(d: Path) -> None:
    """The probe's Qwen-Image block against diffusers' ``QwenImageTransformerBlock``
    with the same weights (prints the max abs difference; raises above 2e-5)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    from modelkit.arch import probes, qwen_image
    from modelkit.io.open import open_source
    from modelkit.testing import write_tensors
    from modelkit.verify.probe_blocks import BLOCKS, Weights, make_inputs

    cfg = qwen_image.small(qwen_image.QwenImageConfig())
    prefix = "transformer_blocks.0."
    keys = {k: s for k, s in qwen_image.transformer_keys(cfg).items() if k.startswith(prefix)}
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / "qwen-block.safetensors", keys, dtype="F32")
    src = open_source(d / "qwen-block.safetensors")
    w = Weights(src, prefix, {k[len(prefix):]: tuple(i.shape) for k, i in src.infos.items()})
    group = next(g for g in probes.qwen_image() if g.kind == probes.QWEN_BLOCK)
    x = make_inputs(group, w, seed=3)
    block = QwenImageTransformerBlock(cfg.hidden, cfg.num_heads, cfg.head_dim)
    block.load_state_dict({k[len(prefix):]: src.get(k) for k in keys})
    with torch.no_grad():
        ours = BLOCKS[group.kind](w, x, group)
        txt, img = block(x["img"], x["txt"], None, x["temb"])
    # the probe reports a residual block's update (output minus input)
    theirs = torch.cat([(img - x["img"]).reshape(-1), (txt - x["txt"]).reshape(-1)])
    diff = float((ours - theirs).abs().max())
    print(f"Qwen-Image block vs diffusers: max abs difference {diff:.3g}")
    if not diff <= 2e-5:
        raise SystemExit("the probe's Qwen-Image block differs from diffusers'")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/modelkit-probe"))
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy", action="store_true", help="also beside one busy process")
    ap.add_argument("--check-math", action="store_true",
                    help="only check the Qwen-Image block math against diffusers'")
    args = ap.parse_args()
    if args.check_math:
        check_math(args.dir)
        return
    ref, cand = make_files(args.dir, args.double, args.single)
    rows = []
    for busy in (False, True) if args.busy else (False,):
        with busy_loop(busy):
            for _ in range(args.rounds):
                row = run_once(ref, cand, args.dir)
                row["busy"] = busy
                log(json.dumps(row))
                rows.append(row)
    print("| run | busy | wall s | probe s | peak RssAnon MB | VmHWM MB | blocks | verdict | "
          "worst rel. error | load before |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(rows):
        print(f"| {i + 1} | {'yes' if r['busy'] else 'no'} | {r['wall_s']} | {r['probe_s']} | "
              f"{r['peak_anon_mb']} | {r['hwm_mb']} | {r['blocks']} | {r['verdict']} | "
              f"{r['worst']:.3g} | {r['load']} |")


if __name__ == "__main__":
    main()
