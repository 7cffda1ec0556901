"""CLIP vision tower as LLaVA-1.5 uses it: hidden state of one layer, CLS dropped."""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn
from transformers import AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from adsc_patch.tower import clip_hidden_state

logger = logging.getLogger(__name__)

SELECT_FEATURES = ("patch", "cls_patch")


def load_clip_image_processor(path: str):
    """The CLIP image processor saved at ``path``: the torchvision backend when installed,
    else the PIL one (same 336x336 tensors; torchvision is not a dependency)."""
    if importlib.util.find_spec("torchvision") is None:
        return CLIPImageProcessorPil.from_pretrained(path)
    return AutoImageProcessor.from_pretrained(path)


class CLIPVisionTower(nn.Module):
    """Wraps ``CLIPVisionModel`` under the attribute name upstream uses (``vision_tower``).

    Args:
        vision_tower: local folder or hub id of the CLIP model (weights, config, processor).
        select_layer: which hidden state to read (-2: the penultimate layer, LLaVA-1.5).
        select_feature: ``"patch"`` drops the CLS token (``grid**2`` tokens), ``"cls_patch"``
            keeps it.
        vision_config: structure of the tower when it does not come from ``vision_tower``
            (self-contained checkpoints); weights are then expected in the checkpoint.
    """

    def __init__(
        self,
        vision_tower: str,
        select_layer: int = -2,
        select_feature: str = "patch",
        vision_config: CLIPVisionConfig | None = None,
    ):
        super().__init__()
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"mm_vision_select_feature {select_feature!r}: expected one of {SELECT_FEATURES}")
        self.vision_tower_name = vision_tower
        self.select_layer = select_layer
        self.select_feature = select_feature
        config = vision_config or CLIPVisionConfig.from_pretrained(vision_tower)
        self.vision_tower = CLIPVisionModel(config)
        self.vision_tower.requires_grad_(False)

    def load_pretrained_weights(self) -> None:
        """Load the CLIP weights from ``vision_tower_name`` into this (already built) tower."""
        logger.info("loading vision tower weights from %s", self.vision_tower_name)
        pretrained = CLIPVisionModel.from_pretrained(self.vision_tower_name, dtype=self.dtype)
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            # both towers are partitioned: gather them, copy in place, re-partition
            import deepspeed

            params = list(pretrained.parameters()) + list(self.vision_tower.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                result = self.vision_tower.load_state_dict(pretrained.state_dict(), strict=False)
        else:
            result = self.vision_tower.load_state_dict(pretrained.state_dict(), strict=False, assign=True)
        if result.missing_keys:
            raise ValueError(f"vision tower {self.vision_tower_name} lacks weights: {result.missing_keys[:5]}")
        self.vision_tower.requires_grad_(False)

    def image_processor(self):
        return load_clip_image_processor(self.vision_tower_name)

    def feature_select(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(n, 1 + N, D)`` -> the selected tokens (CLS dropped for ``"patch"``)."""
        return hidden_states[:, 1:] if self.select_feature == "patch" else hidden_states

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` pixels -> ``(n, num_patches, hidden_size)`` features.

        The layers up to ``select_layer`` run one by one (``adsc_patch.tower``): no output
        capture, whose hooks can be doubled by a capturing call of the model holding the tower.
        """
        pixels = images.to(device=self.device, dtype=self.dtype)
        return self.feature_select(clip_hidden_state(self.vision_tower, pixels, self.select_layer).hidden)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        """Vision tokens per image handed to the language model."""
        return self.num_patches_per_side**2 + (1 if self.select_feature == "cls_patch" else 0)
