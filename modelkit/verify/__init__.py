"""``modelkit verify``: check a checkpoint by static analysis and by
rendering it offline, alone or against a reference.

Public API (torch, diffusers and transformers are imported only when a
function needs them)::

    from modelkit.verify import VerifySettings, verify
    report = verify("out.safetensors", VerifySettings(seeds=(1,)),
                    reference="in.safetensors")
    report.passed, report.to_dict()

See :func:`modelkit.verify.run.verify` and docs/verify.md.
"""

from __future__ import annotations

from modelkit.core.verify_settings import LoraUse, VerifySettings, parse_lora_arg
from modelkit.verify.report import Check, ImageMetrics, VerifyReport
from modelkit.verify.run import VerifySession, verify

__all__ = [
    "Check",
    "ImageMetrics",
    "LoraUse",
    "VerifyReport",
    "VerifySession",
    "VerifySettings",
    "parse_lora_arg",
    "verify",
]
