"""Stage 0 of the playground: pre-train the tiny CLIP vision tower on DigitGrid images.

LLaVA-1.5's tower comes pre-trained; ours is trained here. Three objectives read the layer
LLaVA uses (``mm_vision_select_layer`` -2):

* per patch: the digit of the cell under the patch's centre (or "empty"), and that cell's
  row and column (a pooled image-level objective washes position out, and the language
  model then never learns to look);
* per cell: the digit, from the mean of the patches centred in the cell (patches straddle
  cells, so the patch labels are noisy; this one is what the language model has to read).

Training images have every glyph moved by up to ``jitter`` px inside its cell (augmentation
against memorising the 1,437 training digits; evaluation images are drawn as specified).

The tower sees 88 px inputs with 8 px patches: 11 x 11 tokens that do not line up with the
4 x 4 digit cells (2.75 patches per cell), so 1-D and 2-D token selection are compared on
the methods, not on an alignment accident.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from adsc_patch.tower import clip_hidden_state

from .digitgrid import CELL, GRID, IMAGE_SIZE, Grid, random_grid

logger = logging.getLogger(__name__)

EMPTY_CLASS = 10


def tower_config(image_size: int = 88, patch_size: int = 8, hidden_size: int = 128, layers: int = 3) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 32), image_size=image_size, patch_size=patch_size,
        projection_dim=hidden_size,
    )


def image_processor(image_size: int = 88) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def patch_cells(image_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the digit cell under each patch's centre (patches row-major)."""
    side = image_size // patch_size
    centres = (np.arange(side) + 0.5) * patch_size * IMAGE_SIZE / image_size
    cell_index = np.minimum((centres // CELL).astype(int), GRID - 1)
    rows, cols = np.meshgrid(cell_index, cell_index, indexing="ij")
    return rows.ravel(), cols.ravel()


def cell_classes(cells: tuple) -> np.ndarray:
    """Class of each of the 16 cells: its digit, or ``EMPTY_CLASS``."""
    return np.array([EMPTY_CLASS if c is None else c for c in cells])


def jittered(grid: Grid, rng: np.random.Generator, shift: int, rotate: float = 0.0, scale: float = 0.0) -> Image.Image:
    """``grid`` drawn with every glyph moved by up to ``shift`` px (each axis) inside its cell,
    and, when asked, rotated by up to ``rotate`` degrees and scaled by up to ``1 +- scale``."""
    canvas = np.asarray(grid.render())[..., 0].copy()
    for position in range(GRID * GRID):
        row, col = divmod(position, GRID)
        y, x = row * CELL, col * CELL
        cell = canvas[y:y + CELL, x:x + CELL].copy()
        if rotate or scale:
            glyph = Image.fromarray(cell)
            size = max(1, round(CELL * (1 + rng.uniform(-scale, scale))))
            glyph = glyph.resize((size, size), Image.BILINEAR).rotate(
                rng.uniform(-rotate, rotate), resample=Image.BILINEAR, fillcolor=255)
            framed = Image.new("L", (CELL, CELL), 255)
            framed.paste(glyph, ((CELL - size) // 2, (CELL - size) // 2))
            cell = np.asarray(framed).copy()
        dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
        moved = np.full_like(cell, 255)
        moved[max(0, dy):CELL + min(0, dy), max(0, dx):CELL + min(0, dx)] = \
            cell[max(0, -dy):CELL + min(0, -dy), max(0, -dx):CELL + min(0, -dx)]
        canvas[y:y + CELL, x:x + CELL] = moved
    return Image.fromarray(canvas).convert("RGB")


class _Heads(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.digit = nn.Linear(hidden, 11)
        self.row = nn.Linear(hidden, GRID)
        self.col = nn.Linear(hidden, GRID)
        self.cell = nn.Linear(hidden, 11)


def token_cells(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the digit cell under the centre of each token of a ``rows x cols``
    grid of tokens covering the whole image (tokens row-major; any image size)."""
    cell_row = np.minimum(((np.arange(rows) + 0.5) * GRID / rows).astype(int), GRID - 1)
    cell_col = np.minimum(((np.arange(cols) + 0.5) * GRID / cols).astype(int), GRID - 1)
    grid_rows, grid_cols = np.meshgrid(cell_row, cell_col, indexing="ij")
    return grid_rows.ravel(), grid_cols.ravel()


class _Objective:
    """Labels and losses for one token geometry: ``rows``/``cols`` give each token's cell."""

    @classmethod
    def for_clip(cls, config: CLIPVisionConfig) -> "_Objective":
        return cls(*patch_cells(config.image_size, config.patch_size))

    def __init__(self, rows: np.ndarray, cols: np.ndarray):
        self.rows, self.cols = torch.as_tensor(rows), torch.as_tensor(cols)
        self.cell_of_patch = self.rows * GRID + self.cols
        pool = torch.nn.functional.one_hot(self.cell_of_patch, GRID * GRID).float()
        self.pool = pool / pool.sum(0, keepdim=True)  # (patches, 16): mean over the patches of a cell
        self.loss = nn.CrossEntropyLoss()

    def losses(self, features: torch.Tensor, heads: _Heads, cells: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features`` ``(B, P, D)``; ``cells`` ``(B, 16)`` classes -> loss per objective."""
        device = features.device
        batch = features.shape[0]
        patch_digit = cells[:, self.cell_of_patch].to(device)
        pooled = torch.einsum("bpd,pc->bcd", features, self.pool.to(device))
        return {
            "digit": self.loss(heads.digit(features).flatten(0, 1), patch_digit.flatten()),
            "row": self.loss(heads.row(features).flatten(0, 1), self.rows.to(device).repeat(batch)),
            "col": self.loss(heads.col(features).flatten(0, 1), self.cols.to(device).repeat(batch)),
            "cell": self.loss(heads.cell(pooled).flatten(0, 1), cells.to(device).flatten()),
        }

    def accuracy(self, features: torch.Tensor, heads: _Heads, cells: torch.Tensor) -> dict[str, float]:
        pooled = torch.einsum("bpd,pc->bcd", features, self.pool.to(features.device))
        return {
            "digit": float((heads.digit(features).argmax(-1).cpu() == cells[:, self.cell_of_patch]).float().mean()),
            "row": float((heads.row(features).argmax(-1).cpu() == self.rows).float().mean()),
            "col": float((heads.col(features).argmax(-1).cpu() == self.cols).float().mean()),
            "cell": float((heads.cell(pooled).argmax(-1).cpu() == cells).float().mean()),
        }


def _batch(rng, processor, size: int, split: str, jitter: int, rotate: float = 0.0,
           scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    grids = [random_grid(rng, split) for _ in range(size)]
    augment = jitter or rotate or scale
    images = [jittered(g, rng, jitter, rotate, scale) if augment else g.render() for g in grids]
    pixels = torch.as_tensor(processor(images=images, return_tensors="pt")["pixel_values"])
    return pixels, torch.as_tensor(np.stack([cell_classes(g.cells) for g in grids]))


def _features(tower, pixels: torch.Tensor) -> torch.Tensor:
    """Patch features of the layer LLaVA reads (CLS dropped), ``(B, P, D)``, computed as LLaVA's
    tower computes them (``adsc_patch.tower``: the layers up to it, no output capture)."""
    return clip_hidden_state(tower, pixels, -2).hidden[:, 1:]


def _evaluate(tower, heads, objective, processor, seed, device) -> dict:
    """Accuracies on 64 evaluation grids (digits never seen in training, drawn as specified)."""
    was_training = tower.training
    tower.eval()
    with torch.no_grad():
        pixels, cells = _batch(np.random.default_rng(seed + 1), processor, 64, "eval", 0)
        accuracy = objective.accuracy(_features(tower, pixels.to(device)), heads, cells)
    tower.train(was_training)
    return accuracy


def pretrain_tower(out_dir: str, steps: int = 600, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                   device: str = "cpu", config: CLIPVisionConfig | None = None, jitter: int = 2,
                   rotate: float = 0.0, scale: float = 0.0, log_every: int = 0) -> dict:
    """Train with AdamW (warm-up, cosine), save model and image processor to ``out_dir``;
    returns the evaluation accuracies (``digit`` per patch, ``cell`` per pooled cell, ``row``,
    ``col``) and the minutes it took."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = config or tower_config()
    processor = image_processor(config.image_size)
    tower = CLIPVisionModel(config).to(device)
    heads = _Heads(config.hidden_size).to(device)
    objective = _Objective.for_clip(config)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    start = time.time()
    tower.train()
    for step in tqdm(range(steps), desc="tower", unit="step"):
        pixels, cells = _batch(rng, processor, batch_size, "train", jitter, rotate, scale)
        loss = sum(objective.losses(_features(tower, pixels.to(device)), heads, cells).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            accuracy = _evaluate(tower, heads, objective, processor, seed, device)
            logger.info("tower step %d: loss %.3f, eval accuracy per patch %.3f, per cell %.3f", step + 1,
                        loss.item(), accuracy["digit"], accuracy["cell"])
    accuracy = _evaluate(tower, heads, objective, processor, seed, device)
    tower.to("cpu").save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    accuracy["minutes"] = (time.time() - start) / 60
    logger.info("tower: eval accuracy digit per patch %.3f, per cell %.3f, row %.3f, col %.3f (%.1f min)",
                accuracy["digit"], accuracy["cell"], accuracy["row"], accuracy["col"], accuracy["minutes"])
    return accuracy
