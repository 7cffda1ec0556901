"""Splicing image features into the token sequence (upstream's ``prepare_inputs_labels_for_multimodal``).

Conventions:

* ``input_ids`` hold ``IMAGE_TOKEN_INDEX`` (-200) where an image goes; each marker is
  replaced by that image's ``num_patches`` feature vectors (576 for LLaVA-1.5).
* Images are consumed in marker order, row by row. Upstream's training batches carry one
  image per row, a dummy for text-only rows; that layout is accepted too (rows without a
  marker skip their image).
* The result is re-padded on ``padding_side``; position ids count real tokens only
  (``cumsum(mask) - 1``), so a left-padded row equals the same prompt run alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

__all__ = ["MultimodalInputs", "image_markers_per_row", "assign_images_to_markers", "splice_image_features"]


@dataclass
class MultimodalInputs:
    """What the decoder receives after splicing.

    ``inputs_embeds`` ``(B, T, D)``; ``attention_mask`` ``(B, T)`` long; ``position_ids``
    ``(B, T)``; ``labels`` ``(B, T)`` or None; ``vision_mask`` ``(B, T)`` bool, True at image
    feature positions.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    vision_mask: torch.Tensor


def image_markers_per_row(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    markers = input_ids == IMAGE_TOKEN_INDEX
    if attention_mask is not None:
        markers = markers & attention_mask.bool()
    return markers.sum(1).tolist()


def assign_images_to_markers(markers_per_row: Sequence[int], num_images: int) -> list[list[int]]:
    """For every row, the indices of the images its markers use, in order.

    Raises ``ValueError`` naming the counts when images and markers do not match.
    """
    total = sum(markers_per_row)
    if total == num_images:
        out, next_image = [], 0
        for count in markers_per_row:
            out.append(list(range(next_image, next_image + count)))
            next_image += count
        return out
    if num_images == len(markers_per_row) and all(c <= 1 for c in markers_per_row):
        # Upstream's collator layout: one image per row, a dummy for text-only rows.
        return [[row] if count else [] for row, count in enumerate(markers_per_row)]
    if total > num_images:
        raise ValueError(
            f"the prompts contain {total} <image> markers (per row: {list(markers_per_row)}) "
            f"but only {num_images} image(s) were given"
        )
    raise ValueError(
        f"{num_images} images were given but the prompts contain only {total} <image> markers "
        f"(per row: {list(markers_per_row)})"
    )


def splice_image_features(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_features: Sequence[Sequence[torch.Tensor]],
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    padding_side: str = "right",
    max_length: int | None = None,
) -> MultimodalInputs:
    """Replace every image marker by its features and re-pad the batch.

    Args:
        input_ids: ``(B, L)`` token ids with ``IMAGE_TOKEN_INDEX`` markers.
        attention_mask: ``(B, L)``; padding positions are removed before splicing.
        labels: ``(B, L)`` or None; image positions get ``IGNORE_INDEX``.
        image_features: per row, the ``(N_i, D)`` features of its images in marker order.
        embed_tokens: the language model's token embedding.
        padding_side: ``"left"`` (generation) or ``"right"`` (training).
        max_length: truncate every spliced row to this many tokens (upstream's
            ``tokenizer_model_max_length``); an image cut in two raises ``ValueError``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    rows_embeds, rows_labels, rows_vision = [], [], []
    for row in range(batch):
        keep = attention_mask[row].bool()
        ids = input_ids[row][keep]
        row_labels = labels[row][keep] if labels is not None else None
        marker_positions = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
        if len(marker_positions) != len(image_features[row]):
            raise ValueError(
                f"row {row} has {len(marker_positions)} image markers but {len(image_features[row])} images"
            )
        text_ids = ids.clamp(min=0)
        text_embeds = embed_tokens(text_ids)
        pieces, piece_labels, piece_vision = [], [], []
        start = 0
        for marker, features in zip(marker_positions, image_features[row]):
            pieces.append(text_embeds[start:marker])
            piece_vision.append(torch.zeros(marker - start, dtype=torch.bool, device=ids.device))
            if row_labels is not None:
                piece_labels.append(row_labels[start:marker])
            features = features.to(device=text_embeds.device, dtype=text_embeds.dtype)
            pieces.append(features)
            piece_vision.append(torch.ones(features.shape[0], dtype=torch.bool, device=ids.device))
            if row_labels is not None:
                piece_labels.append(torch.full((features.shape[0],), IGNORE_INDEX, dtype=row_labels.dtype, device=ids.device))
            start = marker + 1
        pieces.append(text_embeds[start:])
        piece_vision.append(torch.zeros(ids.shape[0] - start, dtype=torch.bool, device=ids.device))
        if row_labels is not None:
            piece_labels.append(row_labels[start:])
        embeds = torch.cat(pieces)
        vision = torch.cat(piece_vision)
        spliced_labels = torch.cat(piece_labels) if row_labels is not None else None
        if max_length is not None and embeds.shape[0] > max_length:
            if vision[max_length - 1] and max_length < vision.shape[0] and vision[max_length]:
                raise ValueError(
                    f"row {row}: truncation to {max_length} tokens would cut an image in two "
                    f"(spliced length {embeds.shape[0]}); raise model_max_length or shorten the text"
                )
            embeds, vision = embeds[:max_length], vision[:max_length]
            spliced_labels = spliced_labels[:max_length] if spliced_labels is not None else None
        rows_embeds.append(embeds)
        rows_vision.append(vision)
        rows_labels.append(spliced_labels)

    length = max(e.shape[0] for e in rows_embeds)
    dim = rows_embeds[0].shape[1]
    device, dtype = rows_embeds[0].device, rows_embeds[0].dtype
    inputs_embeds = torch.zeros(batch, length, dim, device=device, dtype=dtype)
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    vision_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    out_labels = (
        torch.full((batch, length), IGNORE_INDEX, dtype=labels.dtype, device=device) if labels is not None else None
    )
    for row, embeds in enumerate(rows_embeds):
        n = embeds.shape[0]
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        inputs_embeds[row, span] = embeds
        mask[row, span] = 1
        vision_mask[row, span] = rows_vision[row]
        if out_labels is not None:
            out_labels[row, span] = rows_labels[row]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return MultimodalInputs(inputs_embeds, mask, position_ids, out_labels, vision_mask)
