"""The LoRA engine: read every common adapter format, bake adapters into
checkpoints, extract LoRAs from fine-tunes, resize/merge/convert them and
show where they act. Importing this package does not import torch."""

from __future__ import annotations

from modelkit.lora.adapter import Adapter, AdapterModule, open_adapter, resolve_target
from modelkit.lora.bake import AdapterUse, BakeReport, bake
from modelkit.lora.convert import convert
from modelkit.lora.extract import ExtractReport, extract
from modelkit.lora.info import InfoReport, info
from modelkit.lora.merge import MergeReport, merge, resize

__all__ = [
    "Adapter",
    "AdapterModule",
    "AdapterUse",
    "BakeReport",
    "ExtractReport",
    "InfoReport",
    "MergeReport",
    "bake",
    "convert",
    "extract",
    "info",
    "merge",
    "open_adapter",
    "resize",
    "resolve_target",
]
