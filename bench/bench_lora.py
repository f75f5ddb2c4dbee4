"""LoRA benchmark: extraction speed/quality and bake speed/memory on full-size
SD1.5 files in /dev/shm (deleted afterwards).

(a) Extraction. BASE is a synthetic fp16 SD1.5 checkpoint; TUNED = BASE + a
    known rank-32 update on every extracted layer (UNet transformers and the
    text encoder) + small noise. ``modelkit lora extract --rank 64`` runs in
    a sampled child (wall time, peak RssAnon, overall relative error). Then,
    on a sample of the same layers (TE layers 0-11 and the UNet transformer
    blocks IN01, IN04, IN07, one per resolution), the same ΔW matrices go
    through modelkit's fast SVD, exact ``torch.linalg.svd`` (thin) truncated
    at 64 (the optimum), and kohya's algorithm (``full_matrices=True``, U·S
    into up, clamp at the 0.99 quantile), all with one torch thread.
(b) Bake. A 264-module rank-32 fp16 SD1.5 LoRA baked into BASE by
    ``modelkit lora bake`` vs ``cp`` of the output in the same run, after a
    warm-up run (page cache, input hash cache), without and with one busy
    competing process (``while True: pass``).

The sampled-layer lines time the SVD and the factors only (the error is
computed outside the timing, with float32 factors, for all three); the
end-to-end line is the real command (reading, ΔW, SVD, error, fp16 factors,
writing), its error measured on the stored fp16 factors.

Run: ``.venv/bin/python bench/bench_lora.py``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_io import (  # noqa: E402
    REPO,
    child_env,
    log,
    machine_load,
    sample_process,
    table,
)

WORK = Path("/dev/shm/modelkit_bench_lora")
UPDATE_RANK = 32
RANK = 64
SAMPLE_BLOCKS = ("down_blocks_0_attentions_0", "down_blocks_1_attentions_0",
                 "down_blocks_2_attentions_0", "lora_te_")


def _targets() -> list:
    from modelkit.lora.extract import extract_targets

    return extract_targets("sd1", conv=False, te=True)


def make_inputs() -> tuple[Path, Path, Path]:
    import torch
    from modelkit.io.stream import write_source

    from modelkit.io.reader import open_model
    from modelkit.io.source import DerivedSource
    from modelkit.testing import write_checkpoint
    from modelkit.testing.lora import write_lora

    WORK.mkdir(parents=True, exist_ok=True)
    base, tuned = WORK / "base.safetensors", WORK / "tuned.safetensors"
    lora = WORK / "lora.safetensors"
    log("generating base (full-size SD1.5, fp16) ...")
    write_checkpoint(base, "sd1", tiny=False, dtype="F16", seed=1)
    targets = {t.key: t for t in _targets()}
    src = open_model(base)

    def produce(key: str) -> torch.Tensor:
        t = src.get(key)
        if key not in targets:
            return t
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        w = t.float().reshape(t.shape[0], -1)
        scale = float(w.norm()) / math.sqrt(w.numel())
        u = torch.randn(w.shape[0], UPDATE_RANK, generator=g)
        v = torch.randn(UPDATE_RANK, w.shape[1], generator=g)
        w += (u @ v) * (0.05 * scale / math.sqrt(UPDATE_RANK))
        w += torch.randn(w.shape, generator=g) * (0.002 * scale)
        return w.reshape(t.shape).half()

    log("generating tuned = base + rank-32 update + noise ...")
    write_source(DerivedSource("tuned", src.infos, {}, produce), tuned)
    log("generating a 264-module rank-32 LoRA ...")
    write_lora(lora, "sd1", tiny=False, rank=UPDATE_RANK, alpha=16.0, seed=3)
    return base, tuned, lora


def child_compare(base: str, tuned: str) -> None:
    """One ΔW per sampled layer through three SVDs; prints JSON."""
    import torch

    from modelkit.io.reader import open_model
    from modelkit.lora.extract import layer_difference
    from modelkit.lora.factorize import OVERSAMPLE, randomized_svd, residual_sq

    torch.set_num_threads(1)
    b, t = open_model(base), open_model(tuned)
    sums = {"fast": [0.0, 0.0], "exact": [0.0, 0.0], "kohya": [0.0, 0.0]}
    ref = 0.0
    n = 0
    for target in _targets():
        if not target.name.startswith(tuple("lora_unet_" + s if not s.startswith("lora_")
                                            else s for s in SAMPLE_BLOCKS)):
            continue
        d, _, _ = layer_difference(b, t, target, "cpu")
        ref_sq = float((d.double() ** 2).sum())
        ref += ref_sq
        n += 1
        s0 = time.perf_counter()  # SVD and factors only; errors outside the timing
        u, s, vh = randomized_svd(d, RANK + OVERSAMPLE)
        up, down = u[:, :RANK] * s[:RANK], vh[:RANK]
        sums["fast"][0] += time.perf_counter() - s0
        sums["fast"][1] += residual_sq(d, up, down)
        s0 = time.perf_counter()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        up, down = u[:, :RANK] * s[:RANK], vh[:RANK]
        sums["exact"][0] += time.perf_counter() - s0
        sums["exact"][1] += residual_sq(d, up, down)
        s0 = time.perf_counter()
        u, s, vh = torch.linalg.svd(d)  # kohya: full_matrices=True
        up, down = u[:, :RANK] @ torch.diag(s[:RANK]), vh[:RANK]
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
        sums["kohya"][0] += time.perf_counter() - s0
        sums["kohya"][1] += residual_sq(d, up, down)
    out = {k: {"seconds": v[0], "relative_error": math.sqrt(v[1] / ref)} for k, v in sums.items()}
    out["layers"] = n
    print(json.dumps(out))


def modelkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelkit", *args]


def run(label: str, cmd: list[str]) -> tuple[float, int, str]:
    log(f"{label} ...")
    r = sample_process(cmd, child_env())
    if r.returncode != 0:
        raise RuntimeError(f"{label}: exited {r.returncode}: {r.stderr[-2000:]}")
    return r.wall_s, r.peak_anon_kb, r.stdout


def inner_seconds(stdout: str) -> float:
    return float(json.loads(stdout)["seconds"])


def section_extract(base: Path, tuned: Path) -> list[str]:
    out = WORK / "extracted.safetensors"
    _, peak, stdout = run("modelkit lora extract", modelkit(
        "lora", "extract", str(base), str(tuned), "-o", str(out), "--rank", str(RANK),
        "-q", "--json", "--overwrite"))
    rep = json.loads(stdout)
    _, _, cmp_out = run("SVD comparison on sampled layers", [
        sys.executable, str(Path(__file__).resolve()), "_compare", str(base), str(tuned)])
    c = json.loads(cmp_out.strip().splitlines()[-1])
    rows = [["modelkit lora extract (all 264 layers, end to end)", f"{inner_seconds(stdout):.1f}",
             f"{rep['report']['relative_error']:.4f}", f"{peak / 1024:.0f}"]]
    for key, label in (("fast", "modelkit fast SVD"), ("exact", "exact torch.linalg.svd"),
                       ("kohya", "kohya full SVD + clamp 0.99")):
        rows.append([f"{label} ({c['layers']} sampled layers)", f"{c[key]['seconds']:.1f}",
                     f"{c[key]['relative_error']:.4f}", ""])
    speedup = c["exact"]["seconds"] / c["fast"]["seconds"]
    gap = c["fast"]["relative_error"] / c["exact"]["relative_error"] - 1
    lines = [table("(a) rank-64 extraction, SD1.5 UNet + TE, 1 torch thread",
                   ["", "seconds", "rel. error", "peak RssAnon MB"], rows),
             f"fast vs exact SVD on the same layers: {speedup:.1f}x faster, relative error "
             f"{100 * gap:+.2f}% of the optimum"]
    out.unlink(missing_ok=True)
    return lines


def section_bake(base: Path, lora: Path) -> list[str]:
    out, copy = WORK / "baked.safetensors", WORK / "copy.safetensors"
    rows = []
    run("modelkit lora bake (warm-up: page cache, input hash cache)", modelkit(
        "lora", "bake", str(base), str(lora), "-o", str(out), "-q", "--overwrite"))
    for mode in ("quiet", "busy"):
        busy = None
        if mode == "busy":
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            wall, peak, stdout = run(f"modelkit lora bake ({mode})", modelkit(
                "lora", "bake", str(base), f"{lora}:0.8", "-o", str(out), "-q", "--json",
                "--overwrite"))
            s0 = time.perf_counter()
            shutil.copyfile(out, copy)
            cp = time.perf_counter() - s0
            s0 = time.perf_counter()
            subprocess.run(["cp", str(out), str(copy)], check=True, cwd=REPO)
            cp = min(cp, time.perf_counter() - s0)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        t = inner_seconds(stdout)
        rows.append([mode, f"{t:.2f}", f"{wall:.2f}", f"{cp:.2f}", f"{t / cp:.2f}x",
                     f"{peak / 1024:.0f}"])
        copy.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    ratio = float(rows[1][1]) / float(rows[0][1])
    return [table("(b) bake 264-module rank-32 LoRA into SD1.5 fp16 (2.1 GB)",
                  ["", "bake s", "wall s (incl. import)", "cp s", "bake/cp",
                   "peak RssAnon MB"], rows), f"busy / quiet: {ratio:.2f}x"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_compare":
        child_compare(sys.argv[2], sys.argv[3])
        return
    try:
        base, tuned, lora = make_inputs()
        before = machine_load()
        lines = section_extract(base, tuned) + section_bake(base, lora)
        after = machine_load()
        print(f"machine before: {before[0]}; after: {after[0]}")
        print("\n".join(lines))
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
