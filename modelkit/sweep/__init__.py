"""Sweeps: XYZ-style grids of recipes, merged, verified and compared in one
table and one contact sheet, locally or on a Ray cluster.

A sweep file names a base recipe and the axes to vary::

    version: 1
    recipe: ../recipes/mix.yaml          # a recipe file (relative to this file),
                                         #   or an inline recipe mapping
    axes:                                # recipe field path -> values
      steps.mix.params.alpha: [0.25, 0.5, 0.75]
      inputs.b: [../models/anime.safetensors, ../models/photo.safetensors]
      # steps.mix.params.alpha: [{preset: in_only}, {preset: out_only}]
      # output.dtype: [fp16, bf16]       options.seed: [1, 2]
    mode: product                        # every combination (default); zip: the
                                         #   i-th values of every axis together
    verify:                              # optional: render and check every cell's
      seeds: [1]                         #   output (the recipe's verify: fields;
      preset: smoke                      #   the base recipe's own section is
                                         #   updated by this one)

Paths in axes are relative to the sweep file. ``output.path`` and
``output.format`` cannot be swept: each cell is written to the sweep
folder as ``cellNN_<values>.safetensors``.

Every cell is validated and planned from headers (a dry run) before any
worker starts; a bad value stops the sweep with one line naming its axis
and value. A file that exists but cannot be read (truncated) fails only its
cells. Then the cells run on an executor (:mod:`modelkit.sweep.executors`:
serial, a local process pool, or Ray), each finished cell is appended to
``sweep.jsonl``, and ``table.md``, ``table.csv`` and ``contact_sheet.png``
are written at the end (:mod:`modelkit.sweep.results`).

In code::

    import threading
    from modelkit.sweep import load_sweep, run_sweep, PoolExecutor

    report = run_sweep(load_sweep("sweep.yaml"), "out/", executor=PoolExecutor(jobs=2),
                       progress=print, cancel=threading.Event())
    report.rows(), report.exit_code, report.to_dict()
"""

from __future__ import annotations

from modelkit.sweep.executors import PoolExecutor, SerialExecutor, make_executor
from modelkit.sweep.plan import CellPlan, plan_sweep
from modelkit.sweep.run import SweepReport, run_sweep
from modelkit.sweep.spec import Axis, Cell, SweepError, SweepSpec, load_sweep, parse_sweep

__all__ = [
    "Axis",
    "Cell",
    "CellPlan",
    "PoolExecutor",
    "SerialExecutor",
    "SweepError",
    "SweepReport",
    "SweepSpec",
    "load_sweep",
    "make_executor",
    "parse_sweep",
    "plan_sweep",
    "run_sweep",
]
