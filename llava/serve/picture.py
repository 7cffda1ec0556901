"""The picture of what a pruned prefill kept, drawn from its ``PruningTrace`` (not recomputed).

In-decoder methods: one panel per stage, the patches whose tokens enter that stage shown,
the rest dimmed. Pre-LLM methods (``trace.merge_groups``): one panel, each merged token's
patches in one colour, dropped patches dark. The image is shown as the model sees it
(padded to a square).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from adsc_patch import PruningTrace

from ..mm_utils import expand2square

__all__ = ["kept_patches_picture", "kept_patch_masks"]

PANEL = 224


def kept_patch_masks(trace: PruningTrace, num_patches: int, row: int = 0) -> list[np.ndarray]:
    """Per stage, a bool ``(num_patches,)`` mask of the first image's patches entering it."""
    stages = trace.kept_vision_positions
    start = int(stages[0][row].min())  # stage 0 holds every vision token of the row
    masks = []
    for stage in stages:
        patches = stage[row].numpy() - start
        mask = np.zeros(num_patches, dtype=bool)
        mask[patches[(patches >= 0) & (patches < num_patches)]] = True
        masks.append(mask)
    return masks


def _panel(image: Image.Image, padded: bool) -> np.ndarray:
    image = image.convert("RGB")
    if padded:
        image = expand2square(image, (127, 127, 127))
    return np.asarray(image.resize((PANEL, PANEL), Image.BICUBIC)).astype(np.float32)


def _patch_map(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(rows*cols, ...)`` per-patch values -> ``(PANEL, PANEL, ...)`` by nearest patch."""
    rows, cols = grid
    values = values.reshape(rows, cols, *values.shape[1:])
    return values[(np.arange(PANEL) * rows) // PANEL][:, (np.arange(PANEL) * cols) // PANEL]


def kept_patches_picture(image: Image.Image, trace: PruningTrace | None, side: int | None, layers: int,
                         grid: tuple[int, int] | None = None) -> Image.Image:
    """A row of labelled panels; ``trace`` ``None``: the whole image (nothing pruned).

    ``side``: LLaVA-1.5's square patch grid (the image padded to a square, as it sees it);
    ``grid``: ``(rows, cols)`` of a model that resizes the image to its own grid instead
    (Qwen2.5-VL's merged tokens; the first image of the trace), shown unpadded."""
    grid = grid or (side, side)
    base = _panel(image, padded=side is not None)
    panels, labels = [], []
    if trace is None:
        what = f"all {grid[0] * grid[1]} patches" if side is not None else "the whole image"
        panels, labels = [base], [f"{what}, layers 0-{layers - 1}"]
    elif trace.merge_groups is not None:
        groups = trace.merge_groups[0].numpy()
        rng = np.random.default_rng(0)
        colours = rng.uniform(40, 255, size=(int(groups.max()) + 1, 3)).astype(np.float32)
        tint = np.where(groups[:, None] >= 0, colours[np.clip(groups, 0, None)], 0.0)
        tint_map = _patch_map(tint, grid)
        dropped = _patch_map(groups < 0, grid)[..., None]
        panel = np.where(dropped, base * 0.15, 0.45 * base + 0.55 * tint_map)
        panels.append(panel)
        labels.append(f"{int(groups.max()) + 1} merged tokens")
    else:
        bounds = list(zip((0, *trace.prune_layers), (*trace.prune_layers, layers)))
        for mask, (first, end) in zip(kept_patch_masks(trace, grid[0] * grid[1]), bounds):
            shown = _patch_map(mask, grid)[..., None]
            panels.append(np.where(shown, base, base * 0.2 + 20))
            span = f"layer {first}" if end - 1 == first else f"layers {first}-{end - 1}"
            labels.append(f"{span}: {int(mask.sum())}")
    gap, caption = 6, 18
    canvas = Image.new("RGB", (len(panels) * (PANEL + gap) - gap, PANEL + caption), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x = i * (PANEL + gap)
        canvas.paste(Image.fromarray(np.clip(panel, 0, 255).astype(np.uint8)), (x, caption))
        draw.text((x + 2, 3), label, fill="black")
    return canvas
