"""Prompt and image handling with upstream LLaVA's function names and semantics."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

import logging

from .cli import InputError
from .constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

__all__ = [
    "ImageLoadError",
    "check_image",
    "load_image",
    "expand2square",
    "process_images",
    "tokenizer_image_token",
    "tokenizer_image_token_with_offsets",
    "get_model_name_from_path",
    "context_length",
    "fit_new_tokens",
    "prompt_length_with_images",
]


logger = logging.getLogger(__name__)


class ImageLoadError(InputError):
    """An image file that is missing or cannot be decoded."""


_JPEG_END = b"\xff\xd9"


def check_image(path: str | os.PathLike, decode_cut_jpeg: bool = False) -> None:
    """Raise ``ImageLoadError`` unless ``path`` is an image file whose structure is intact.

    Cheap: ``PIL.Image.verify`` reads the header and, for PNG, every chunk's checksum (a cut
    PNG fails); there is no full decode, so a cut JPEG passes and fails later in
    ``load_image``. ``decode_cut_jpeg`` also decodes a JPEG whose end marker is missing from
    its last kilobyte (a cut one then fails; one with trailing bytes still passes). The
    ``ImageLoadError`` of an undecodable file carries PIL's error as ``__cause__``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            kind = image.format
            image.verify()
        if decode_cut_jpeg and kind == "JPEG" and not _ends_like_jpeg(path):
            with Image.open(path) as image:
                image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"not a readable image: {path} ({error})") from error


def _ends_like_jpeg(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 1024))
        return _JPEG_END in f.read()


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` as an RGB image; a missing or undecodable file raises ``ImageLoadError``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ImageLoadError(f"not a readable image: {path} ({error})") from error


def expand2square(image: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Paste ``image`` centred on a square canvas of its longer side filled with ``background_color``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def process_images(images: Sequence[Image.Image], image_processor, model_cfg) -> torch.Tensor:
    """Pixel values ``(n, 3, H, W)`` for a list of PIL images, as LLaVA-1.5 prepares them.

    ``model_cfg.image_aspect_ratio == "pad"``: each image is first padded to a square with
    the processor's mean colour (``int(255 * mean)`` per channel); otherwise the processor
    alone resizes the shorter side and centre-crops.
    """
    aspect = getattr(model_cfg, "image_aspect_ratio", None)
    if aspect not in (None, "pad", "square", "resize", "crop"):
        raise ValueError(f"image_aspect_ratio {aspect!r} is not supported (LLaVA-1.5 uses 'pad')")
    images = [image.convert("RGB") for image in images]
    if aspect == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        images = [expand2square(image, background) for image in images]
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(pixel_values)


def tokenizer_image_token(
    prompt: str,
    tokenizer,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
):
    """Token ids of ``prompt`` with ``image_token_index`` in place of every ``<image>``.

    The text between markers is tokenised piece by piece (as upstream does), one BOS is kept
    at the start when the tokenizer adds one.
    """
    ids, _ = tokenizer_image_token_with_offsets(prompt, tokenizer, image_token_index)
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    if return_tensors is not None:
        raise ValueError(f"unsupported tensor type {return_tensors!r}")
    return ids


def tokenizer_image_token_with_offsets(
    prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX
) -> tuple[list[int], list[tuple[int, int]]]:
    """``tokenizer_image_token`` plus each token's ``(start, end)`` character span in
    ``prompt`` (BOS: ``(0, 0)``; an image marker: the span of its ``<image>``)."""
    chunks = prompt.split(DEFAULT_IMAGE_TOKEN)
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    position = 0
    adds_bos = False
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(image_token_index)
            offsets.append((position, position + len(DEFAULT_IMAGE_TOKEN)))
            position += len(DEFAULT_IMAGE_TOKEN)
        encoded = tokenizer(chunk, return_offsets_mapping=True)
        piece, piece_offsets = list(encoded.input_ids), list(encoded.offset_mapping)
        if i == 0:
            adds_bos = bool(piece) and bos is not None and piece[0] == bos
        if adds_bos and piece and piece[0] == bos:
            piece, piece_offsets = piece[1:], piece_offsets[1:]
        ids.extend(piece)
        offsets.extend((position + a, position + b) for a, b in piece_offsets)
        position += len(chunk)
    if adds_bos:
        ids.insert(0, bos)
        offsets.insert(0, (0, 0))
    return ids, offsets


def get_model_name_from_path(model_path: str) -> str:
    """Last path component, or ``parent_checkpoint-N`` for Trainer checkpoints."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def context_length(config) -> int:
    """Tokens a model reads at most: the training context (``tokenizer_model_max_length``), else
    ``max_position_embeddings``."""
    return getattr(config, "tokenizer_model_max_length", None) or config.max_position_embeddings


def prompt_length_with_images(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                              tokens_per_image: int) -> int:
    """Tokens of the longest prompt of a ``(B, L)`` batch once each image marker is replaced by
    ``tokens_per_image`` vision tokens (padding not counted)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    markers = ((input_ids == IMAGE_TOKEN_INDEX) & real).sum(1)
    return int((real.sum(1) + markers * (tokens_per_image - 1)).max())


def fit_new_tokens(prompt_tokens: int, max_new_tokens: int, context: int, fix: str) -> int:
    """``max_new_tokens`` cut to the room the context leaves after the prompt (one log line when
    it cuts). A prompt that leaves no room raises ``InputError``; ``fix`` says what helps
    (e.g. "start a new chat" or "shorten --query")."""
    room = context - prompt_tokens
    if room < 1:
        raise InputError(f"the prompt is {prompt_tokens} tokens with its image(s), which fills the context length "
                         f"of {context}: {fix}")
    if max_new_tokens > room:
        logger.info("max_new_tokens %d cut to %d: the prompt is %d tokens of the context length %d",
                    max_new_tokens, room, prompt_tokens, context)
        return room
    return max_new_tokens
