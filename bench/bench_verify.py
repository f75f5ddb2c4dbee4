"""Benchmark ``modelkit verify``: the full verify of a tiny checkpoint, and
of a full-size SD1.5-shaped synthetic file at the smoke preset (256x256, 4
steps), each in a fresh process with its peak anonymous RSS, next to a bare
diffusers script that loads the same file the same way and renders the same
images (the floor verify's checks sit on).

Run: ``.venv/bin/python bench/bench_verify.py [--dir /dev/shm/modelkit-bench]``.
The full-size part needs a real CLIP tokenizer (found as ``modelkit verify``
finds one, e.g. an installed open-clip-torch wheel, or ``--tokenizer``) and
about 3 GB in DIR; ``--tiny-only`` skips it, ``--full-only`` runs only the
full-size verify (``--no-peer``: without the bare diffusers yardstick).
``--reference`` adds a full-size verify against a reference (the same file
under another name: two pipelines built, one after the other, so its peak
memory shows whether the first was freed). Figures vary with machine load:
the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_io import child_env, log, machine_load, sample_process

FULL_NAME = "full-sd15-fp16.safetensors"  # shared with the other benchmarks
SEEDS = "1"


@dataclass
class Row:
    label: str
    wall_s: float
    peak_anon_mb: float
    images: int
    timings: dict[str, float]
    verdict: str


def modelkit_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("modelkit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "modelkit"]


def run_verify(label: str, args: list[str]) -> Row:
    log(f"{label} ...")
    env = {**child_env(), "HF_HUB_OFFLINE": "1"}
    run = sample_process([*modelkit_cmd(), "verify", *args, "--json", "-q"], env)
    if run.returncode not in (0, 1):
        raise SystemExit(f"{label}: exit {run.returncode}\n{run.stderr[-2000:]}")
    d = json.loads(run.stdout)
    return Row(label, run.wall_s, run.peak_anon_kb / 1024, len(d["images"]) + 1,
               d["timings"], d["verdict"])


PEER = """
import sys, time, torch, diffusers
from pathlib import Path
from modelkit.io.reader import open_model
from modelkit.convert.diffusers import write_diffusers_configs
from modelkit.verify.tokenizer import find_tokenizer, explicit_source, load_tokenizer
from modelkit.core.verify_library import Library
model, cfg, tok_path, size, steps, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
with open_model(model) as src:
    write_diffusers_configs(src, cfg)
tok = load_tokenizer(explicit_source(Path(tok_path)) if tok_path != "-" else
                     find_tokenizer(Library(None)))
pipe = diffusers.StableDiffusionPipeline.from_single_file(
    model, config=cfg, local_files_only=True, torch_dtype=torch.float32, tokenizer=tok)
pipe.set_progress_bar_config(disable=True)
t1 = time.perf_counter()
for prompt in ("a red fox in snow", "a lighthouse on an island", "a red fox in snow"):
    pipe(prompt, negative_prompt="blurry", num_inference_steps=int(steps),
         height=int(size), width=int(size), generator=torch.Generator().manual_seed(1))
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
"""


def run_peer(label: str, model: Path, work: Path, tokenizer: str, size: int, steps: int,
             threads: int) -> Row:
    log(f"{label} ...")
    cfg = work / f"peer-config-{model.stem}"
    if cfg.exists():
        import shutil

        shutil.rmtree(cfg)
    env = {**child_env(), "HF_HUB_OFFLINE": "1"}
    run = sample_process([sys.executable, "-c", PEER, str(model), str(cfg), tokenizer,
                          str(size), str(steps), str(threads)], env)
    if run.returncode != 0:
        raise SystemExit(f"{label}: exit {run.returncode}\n{run.stderr[-2000:]}")
    load_s, render_s = (float(x) for x in run.stdout.split()[-2:])
    return Row(label, run.wall_s, run.peak_anon_kb / 1024, 3,
               {"load": load_s, "render": render_s}, "-")


def tiny_library(d: Path) -> Path:
    """A tiny SD1 checkpoint in a library with the synthetic tokenizer."""
    from modelkit import testing
    from modelkit.verify.tokenizer import write_synthetic_tokenizer

    lib = d / "bench_verify-tiny"
    model = lib / "models" / "Stable-diffusion" / "tiny-sd15.safetensors"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        testing.write_checkpoint(model, "sd1", seed=1)
        write_synthetic_tokenizer(lib / "models" / "tokenizers" / "clip")
    return model


def full_model(d: Path) -> tuple[Path, bool]:
    from modelkit.io.header import read_header

    path = d / FULL_NAME
    if path.exists():
        try:
            if len(read_header(path).tensors) >= 1130:
                return path, False
        except Exception:
            pass
    from modelkit.testing import write_checkpoint

    log(f"generating {path} (2.1 GB) ...")
    start = time.perf_counter()
    write_checkpoint(path, "sd1", tiny=False, dtype="F16")
    log(f"generated in {time.perf_counter() - start:.1f} s")
    return path, True


def per_image(row: Row) -> str:
    render = row.timings.get("render_candidate", row.timings.get("render"))
    return f"{render / row.images:.2f}" if render else "-"


def table(rows: list[Row]) -> list[str]:
    out = [f"{'run':<44} {'wall s':>7} {'load s':>7} {'render s':>9} {'s/image':>8} "
           f"{'peak RssAnon MB':>16} verdict"]
    for r in rows:
        load = r.timings.get("load_candidate", r.timings.get("load", 0.0))
        render = r.timings.get("render_candidate", r.timings.get("render", 0.0))
        out.append(f"{r.label:<44} {r.wall_s:>7.2f} {load:>7.2f} {render:>9.2f} "
                   f"{per_image(r):>8} {r.peak_anon_mb:>16.0f} {r.verdict}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/modelkit-bench"))
    ap.add_argument("--tokenizer", help="CLIP tokenizer for the full-size run")
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--full-only", action="store_true", help="skip the tiny runs")
    ap.add_argument("--no-peer", action="store_true", help="skip the bare diffusers runs")
    ap.add_argument("--reference", action="store_true",
                    help="also verify the full-size file against a reference")
    ap.add_argument("--keep", action="store_true", help="keep the files this run made")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    before = machine_load()[0]
    rows: list[Row] = []
    made: list[Path] = []
    tiny = tiny_library(args.dir)
    if not args.full_only:
        for i in (1, 2):
            rows.append(run_verify(f"verify tiny SD1 (64x64, 2 steps) run {i}",
                                   [str(tiny), "--seeds", SEEDS]))
        if not args.no_peer:
            rows.append(run_peer("bare diffusers, same tiny file and images", tiny, args.dir,
                                 str(tiny.parents[1] / "tokenizers" / "clip"), 64, 2, 1))
    notes = []
    if not args.tiny_only:
        from modelkit.core.verify_library import Library
        from modelkit.verify.tokenizer import find_tokenizer

        tok = args.tokenizer
        if tok is None:
            try:
                src = find_tokenizer(Library(None))
                tok = str(src.location)
                notes.append(f"tokenizer: {src.description}")
            except Exception as exc:
                notes.append(f"full-size run skipped: {exc}")
        if tok is not None:
            full, generated = full_model(args.dir)
            if generated:
                made.append(full)
            rows.append(run_verify("verify full SD1.5 shape (smoke 256x256, 4 st.)",
                                   [str(full), "--seeds", SEEDS, "--tokenizer", tok]))
            if args.reference:
                ref = args.dir / f"reference-{FULL_NAME}"
                ref.unlink(missing_ok=True)
                ref.hardlink_to(full)
                made.append(ref)
                rows.append(run_verify("verify full SD1.5 vs a reference (2 pipelines)",
                                       [str(full), "--reference", str(ref), "--seeds", SEEDS,
                                        "--tokenizer", tok]))
            if not args.no_peer:
                from modelkit.core.verify_settings import default_threads

                threads = default_threads("smoke")
                rows.append(run_peer("bare diffusers, same full file and images", full,
                                     args.dir, tok, 256, 4, threads))
    print(f"machine: {before} (before); {machine_load()[0]} (after)")
    print("\n".join(table(rows)))
    for r in rows:
        if r.verdict != "-":
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r.timings.items())
            print(f"  {r.label}: {phases}")
    for n in notes:
        print(f"note: {n}")
    if not args.keep:
        import shutil

        for p in made:
            p.unlink(missing_ok=True)
        shutil.rmtree(tiny.parents[2], ignore_errors=True)
        for cfg in args.dir.glob("peer-config-*"):
            shutil.rmtree(cfg, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
