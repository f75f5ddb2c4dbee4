"""Read the metadata people care about out of a file's ``__metadata__``:
kohya's ``ss_*`` training record (with the most frequent caption tags),
ModelSpec, and merge provenance. Values stay strings from the file: front
ends must make them safe before showing them (:mod:`modelkit.textsafe`)."""

from __future__ import annotations

import datetime
import json
from collections import Counter
from typing import Any

# ss_* keys worth showing, with their labels, in display order
TRAINING_FIELDS = (
    ("ss_output_name", "output name"),
    ("ss_network_module", "network"),
    ("ss_network_dim", "rank (dim)"),
    ("ss_network_alpha", "alpha"),
    ("ss_network_args", "network args"),
    ("ss_base_model_version", "base version"),
    ("ss_sd_model_name", "trained on"),
    ("ss_resolution", "resolution"),
    ("ss_num_train_images", "images"),
    ("ss_num_epochs", "epochs"),
    ("ss_steps", "steps"),
    ("ss_max_train_steps", "max steps"),
    ("ss_learning_rate", "lr"),
    ("ss_unet_lr", "UNet lr"),
    ("ss_text_encoder_lr", "TE lr"),
    ("ss_optimizer", "optimizer"),
    ("ss_lr_scheduler", "scheduler"),
    ("ss_mixed_precision", "precision"),
    ("ss_clip_skip", "clip skip"),
    ("ss_noise_offset", "noise offset"),
    ("ss_v2", "SD2"),
    ("ss_v_parameterization", "v-prediction"),
    ("ss_training_comment", "comment"),
)
TIME_FIELDS = (("ss_training_started_at", "started"), ("ss_training_finished_at", "finished"))
MERGE_KEYS = ("modelkit.recipe", "sd_merge_recipe", "sd_merge_models", "modelkit.inputs",
              "modelkit.history")


def training_info(meta: dict[str, str]) -> list[tuple[str, str]]:
    """(label, value) pairs of kohya's training record, in a useful order."""
    rows = [(label, meta[key]) for key, label in TRAINING_FIELDS
            if meta.get(key) not in (None, "", "None")]
    for key, label in TIME_FIELDS:
        try:
            stamp = float(meta[key])
        except (KeyError, ValueError):
            continue
        when = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)
        rows.append((label, when.strftime("%Y-%m-%d %H:%M UTC")))
    return rows


def top_tags(meta: dict[str, str], n: int = 20) -> list[tuple[str, int]]:
    """The ``n`` most frequent caption tags over every dataset in
    ``ss_tag_frequency`` (JSON: dataset -> tag -> count)."""
    try:
        freq = json.loads(meta.get("ss_tag_frequency") or "{}")
    except ValueError:
        return []
    counts: Counter[str] = Counter()
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, int):
                        counts[str(tag).strip()] += count
    return counts.most_common(n)


def modelspec(meta: dict[str, str]) -> list[tuple[str, str]]:
    """(field, value) pairs of ``modelspec.*`` (the SAI model spec), hashes
    and thumbnails left out."""
    skip = ("modelspec.thumbnail", "modelspec.hash_sha256")
    return [(k.removeprefix("modelspec."), v) for k, v in sorted(meta.items())
            if k.startswith("modelspec.") and k not in skip]


def merge_summary(meta: dict[str, str]) -> dict[str, Any]:
    """The merge/convert provenance fields present, parsed where JSON."""
    out: dict[str, Any] = {}
    for key in MERGE_KEYS:
        raw = meta.get(key)
        if not raw:
            continue
        if key == "modelkit.recipe":
            out[key] = raw
            continue
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def other_metadata(meta: dict[str, str]) -> list[tuple[str, str]]:
    """Fields not covered by the training, ModelSpec and merge views."""
    covered = {k for k, _ in TRAINING_FIELDS} | {k for k, _ in TIME_FIELDS} | set(MERGE_KEYS)
    return [(k, v) for k, v in sorted(meta.items())
            if k not in covered and not k.startswith("modelspec.")
            and k not in ("ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info",
                          "ss_datasets")]
