"""The playground's second architecture: a tiny Qwen2.5-VL of transformers' own classes.

Its vision encoder (``Qwen2_5_VisionTransformerPretrainedModel``: 6-pixel patches, windowed
and full attention, 2-D rotary positions, the 2 x 2 merger) is pre-trained on DigitGrid
images of varying size (``digitgrid.SIZES``) with ``playground.tower``'s objectives, read on
the merger's output, the tokens the language model sees: one per 12 x 12 px, so a 120 x 120
image is 10 x 10 = 100 tokens, 168 x 168 is 14 x 14 = 196, 120 x 168 is 14 rows of 10; a cell
is 2.5 to 3.5 tokens wide, so tokens and cells line up only at 144 px.

The checkpoint is written by ``llava.tools.make_tiny_vlm`` (Qwen's special tokens, processor
and chat template) with this tower, a 16-layer M-RoPE language model and a tokenizer that
keeps " 7" and " _" whole, so a transcription is one token per cell as in the LLaVA-1.5 study
(Qwen's own tokenizer isolates every digit, and a cell then takes one or two tokens).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .digitgrid import SIZES, random_grid
from .tower import _Heads, _Objective, cell_classes, jittered, token_cells

logger = logging.getLogger(__name__)

PATCH_SIZE = 6
MERGE_SIZE = 2


def vision_config(hidden_size: int = 96, layers: int = 4, out_hidden_size: int = 96) -> dict:
    """``Qwen2_5_VLVisionConfig`` arguments: windows of 4 x 4 merged tokens (48 px), full
    attention in every second layer (Qwen2.5-VL-7B: 4 of 32)."""
    return dict(depth=layers, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_heads=max(1, hidden_size // 32), out_hidden_size=out_hidden_size, patch_size=PATCH_SIZE,
                spatial_merge_size=MERGE_SIZE, temporal_patch_size=2, in_channels=3,
                fullatt_block_indexes=list(range(1, layers, 2)), window_size=4 * MERGE_SIZE * PATCH_SIZE)


def image_processor(sizes: Sequence[int] = SIZES):
    """Qwen2-VL's image processor, with pixel bounds that keep every DigitGrid size as it is
    (all are multiples of 12 = patch x merge)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2,
                                    min_pixels=min(sizes) ** 2, max_pixels=max(sizes) ** 2)


def image_tokens(width: int, height: int, sizes: Sequence[int] = SIZES) -> int:
    """Vision tokens of a ``width x height`` image under ``image_processor(sizes)`` (Qwen's
    ``smart_resize`` to multiples of 12 px within its pixel bounds, one token per 12 x 12 px)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    side = PATCH_SIZE * MERGE_SIZE
    resized_height, resized_width = smart_resize(height, width, factor=side, min_pixels=min(sizes) ** 2,
                                                 max_pixels=max(sizes) ** 2)
    return (resized_height // side) * (resized_width // side)


def _merged_grid(width: int, height: int) -> tuple[int, int]:
    """Rows and columns of merged tokens of a ``width x height`` image (kept at its size)."""
    side = PATCH_SIZE * MERGE_SIZE
    return height // side, width // side


def _batch(rng, processor, count: int, split: str, size: tuple[int, int], jitter: int):
    grids = [random_grid(rng, split) for _ in range(count)]
    # as digitgrid renders a size: the 96 x 96 grid, resized (bilinear)
    images = [jittered(g, rng, jitter).resize(size, Image.BILINEAR) if jitter else g.render(size) for g in grids]
    encoded = processor(images=images, return_tensors="pt")
    cells = torch.as_tensor(np.stack([cell_classes(g.cells) for g in grids]))
    return encoded["pixel_values"], encoded["image_grid_thw"], cells


def _features(tower, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The merger's output per image, ``(B, tokens, D)`` (every image of the batch one size)."""
    merged = tower(pixels, grid_thw=grid_thw).pooler_output
    return merged.reshape(grid_thw.shape[0], -1, merged.shape[-1])


def _evaluate(tower, heads, processor, seed: int, device: str, sizes: Sequence[int]) -> dict:
    """Accuracies on 32 evaluation grids at each of three sizes, the smallest, the largest and
    the tallest (digits never seen in training)."""
    was_training = tower.training
    tower.eval()
    totals: dict[str, list[float]] = {}
    rng = np.random.default_rng(seed + 1)
    with torch.no_grad():
        for size in ((min(sizes),) * 2, (max(sizes),) * 2, (min(sizes), max(sizes))):
            pixels, grid_thw, cells = _batch(rng, processor, 32, "eval", size, 0)
            objective = _Objective(*token_cells(*_merged_grid(*size)))
            for name, value in objective.accuracy(_features(tower, pixels.to(device), grid_thw.to(device)),
                                                  heads, cells).items():
                totals.setdefault(name, []).append(value)
    tower.train(was_training)
    return {name: float(np.mean(values)) for name, values in totals.items()}


def pretrain_tower(out_dir: str, config: dict, steps: int = 600, batch_size: int = 32, lr: float = 2e-3,
                   seed: int = 0, device: str = "cpu", jitter: int = 2, sizes: Sequence[int] = SIZES,
                   log_every: int = 0) -> dict:
    """Train the vision encoder with its merger (AdamW, warm-up, cosine): every step one size,
    width and height drawn from ``sizes``; save it (``save_pretrained``) and its image
    processor to ``out_dir``. Returns the evaluation accuracies and the minutes it took."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    processor = image_processor(sizes)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLVisionConfig(**config)).to(device)
    heads = _Heads(config["out_hidden_size"]).to(device)
    objectives: dict[tuple[int, int], _Objective] = {}
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    start = time.time()
    tower.train()
    for step in tqdm(range(steps), desc="tower", unit="step"):
        size = (int(rng.choice(sizes)), int(rng.choice(sizes)))
        pixels, grid_thw, cells = _batch(rng, processor, batch_size, "train", size, jitter)
        objective = objectives.setdefault(size, _Objective(*token_cells(*_merged_grid(*size))))
        loss = sum(objective.losses(_features(tower, pixels.to(device), grid_thw.to(device)), heads, cells).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            accuracy = _evaluate(tower, heads, processor, seed, device, sizes)
            logger.info("tower step %d: loss %.3f, eval accuracy per token %.3f, per cell %.3f", step + 1,
                        loss.item(), accuracy["digit"], accuracy["cell"])
    accuracy = _evaluate(tower, heads, processor, seed, device, sizes)
    tower.to("cpu").save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    accuracy["minutes"] = (time.time() - start) / 60
    logger.info("tower: eval accuracy digit per token %.3f, per cell %.3f, row %.3f, col %.3f (%.1f min)",
                accuracy["digit"], accuracy["cell"], accuracy["row"], accuracy["col"], accuracy["minutes"])
    return accuracy


def build_initial_checkpoint(out: str, tower_dir: str, layers: int = 16, hidden_size: int = 96,
                             intermediate_size: int = 192, seed: int = 0) -> str:
    """A Qwen2.5-VL checkpoint with a random language model and the pre-trained tower (merger
    included), in the layout of a released one (``llava.tools.make_tiny_vlm``)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from llava.tools.make_tiny_vlm import make_tiny_vlm

    from .digitgrid import questions_for

    rng = np.random.default_rng(seed)
    text = []
    for _ in range(50):
        grid = random_grid(rng, "train")
        text += [question + " " + answer for _, question, answer in questions_for(grid, rng)]
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tower = Qwen2_5_VisionTransformerPretrainedModel.from_pretrained(tower_dir)
    make_tiny_vlm(out, seed=seed, layers=layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  heads=max(2, hidden_size // 32), kv_heads=max(2, hidden_size // 32), extra_text=text, vision_config=tower.config.to_dict(),
                  image_processor=Qwen2VLImageProcessorPil.from_pretrained(tower_dir), split_digits=False)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    model.model.visual.load_state_dict(tower.state_dict())
    model.save_pretrained(out)
    return out
