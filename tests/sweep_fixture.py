"""The sweep the sweep tests share: weighted_sum of two tiny SD1 models over
two alphas and two B-models, one of them truncated (its cells fail, the
others run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ALPHAS = (0.25, 0.75)
# what the table holds that does not depend on the executor or the clock
STABLE_COLUMNS = ("cell", "alpha", "b", "status", "sha256", "output", "error")


def write_sweep(root: Path, models: dict[str, Path], alphas: tuple[float, ...] = ALPHAS,
                with_bad: bool = True) -> Path:
    """A base recipe, a truncated copy of model B and the sweep file
    (``alphas`` x B-models: model B and, ``with_bad``, the truncated copy)."""
    root.mkdir(parents=True, exist_ok=True)
    data = models["sd1_b"].read_bytes()
    (root / "bad.safetensors").write_bytes(data[: len(data) // 2])
    (root / "base.yaml").write_text(f"""version: 1
inputs:
  a: {models['sd1']}
  b: {models['sd1_b']}
steps:
  mix: {{method: weighted_sum, models: [a, b], params: {{alpha: 0.5}}}}
output: {{path: unused.safetensors}}
""")
    sweep = root / "sweep.yaml"
    sweep.write_text(f"""version: 1
recipe: base.yaml
axes:
  steps.mix.params.alpha: [{', '.join(map(str, alphas))}]
  inputs.b: [{models['sd1_b']}{', bad.safetensors' if with_bad else ''}]
""")
    return sweep


def stable_rows(report: Any) -> list[dict[str, Any]]:
    """The table without its timings (and the sweep's own folder in
    errors)."""
    root = str(report.out_dir.parent)
    return [{k: (r[k].replace(root, "ROOT") if k == "error" and r[k] else r[k])
             for k in STABLE_COLUMNS} for r in report.rows()]


def run_fixture_sweep(root: Path, models: dict[str, Path], executor: Any) -> Any:
    """Write the sweep under ``root`` and run it into ``root/out``."""
    from modelkit.sweep import load_sweep, run_sweep

    sweep = write_sweep(root, models)
    return run_sweep(load_sweep(sweep), root / "out", executor=executor)
