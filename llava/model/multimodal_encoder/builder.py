"""Build the vision tower named by a LLaVA config."""

from __future__ import annotations

import os

from transformers import CLIPVisionConfig

from .clip_encoder import CLIPVisionTower


def resolve_vision_tower(name: str, checkpoint_dir: str | None = None) -> str:
    """Where ``mm_vision_tower`` points: an absolute path, a folder relative to the
    checkpoint, a folder relative to the working directory, or (else) a hub id."""
    if os.path.isabs(name) or not checkpoint_dir:
        return name
    beside_checkpoint = os.path.join(checkpoint_dir, name)
    if os.path.isdir(beside_checkpoint):
        return beside_checkpoint
    return name


def build_vision_tower(config, checkpoint_dir: str | None = None) -> CLIPVisionTower:
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ValueError("config has no mm_vision_tower")
    path = resolve_vision_tower(name, checkpoint_dir or getattr(config, "_name_or_path", None))
    vision_config = None
    if getattr(config, "mm_vision_config", None):
        vision_config = CLIPVisionConfig(**config.mm_vision_config)
    elif not (os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE") != "1"):
        raise FileNotFoundError(
            f"vision tower {name!r} is not a local folder and the hub is offline "
            "(HF_HUB_OFFLINE=1): point mm_vision_tower (or load_pretrained_model's "
            "vision_tower=) at a local copy of the CLIP model"
        )
    return CLIPVisionTower(
        path,
        select_layer=getattr(config, "mm_vision_select_layer", -2),
        select_feature=getattr(config, "mm_vision_select_feature", "patch"),
        vision_config=vision_config,
    )
