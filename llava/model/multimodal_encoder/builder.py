"""Build the vision tower named by a LLaVA config."""

from __future__ import annotations

import os

from transformers import CLIPVisionConfig

from ..hub import ResolutionError, resolve_pretrained
from .clip_encoder import CLIPVisionTower


def resolve_vision_tower(name: str, checkpoint_dir: str | None = None) -> str:
    """``name`` as a folder beside the checkpoint when there is one, else ``name`` unchanged
    (an absolute or working-directory folder, or a hub id resolved when the tower is built)."""
    if os.path.isabs(name) or not checkpoint_dir:
        return name
    beside_checkpoint = os.path.join(checkpoint_dir, name)
    if os.path.isdir(beside_checkpoint):
        return beside_checkpoint
    return name


def build_vision_tower(config, checkpoint_dir: str | None = None) -> CLIPVisionTower:
    """The tower of ``config.mm_vision_tower``: a folder (beside the checkpoint, absolute or
    relative to the working directory) or a hub id, offline from the Hugging Face cache."""
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ValueError("config has no mm_vision_tower")
    vision_config = None
    if getattr(config, "mm_vision_config", None):
        vision_config = CLIPVisionConfig(**config.mm_vision_config)
    try:
        path = resolve_pretrained(name, "vision tower", local_only=vision_config is not None,
                                  relative_to=(checkpoint_dir or getattr(config, "_name_or_path", None),))
    except ResolutionError as error:
        if vision_config is None:
            raise ResolutionError(
                f"{error}: point mm_vision_tower (or --vision-tower / load_pretrained_model's vision_tower=) "
                "at a local copy of the CLIP model"
            ) from None
        path = name  # the structure is in the config and the weights in the checkpoint
    return CLIPVisionTower(
        path,
        select_layer=getattr(config, "mm_vision_select_layer", -2),
        select_feature=getattr(config, "mm_vision_select_feature", "patch"),
        vision_config=vision_config,
    )
