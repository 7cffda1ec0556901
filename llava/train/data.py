"""LLaVA instruction data: upstream's JSON format, read lazily, masked by character spans.

A sample is ``{"id", "image" (optional, relative to --image_folder), "conversations":
[{"from": "human"|"gpt", "value": ...}, ...]}`` with ``<image>`` in the first human turn
when there is an image. The conversation is rendered with the template, tokenised once
with offsets, and a token is a target exactly when its characters lie inside an assistant
reply (with its ``</s>``): no per-piece length arithmetic, so nothing can silently drift
out of line. A token straddling a reply's boundary, or a reply whose tokens do not decode
back to it, is an error naming the sample.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from ..conversation import get_conv_template
from ..mm_utils import load_image, process_images, tokenizer_image_token_with_offsets

logger = logging.getLogger(__name__)

__all__ = ["DataError", "load_records", "validate_records", "encode_conversation", "LazySupervisedDataset",
           "DataCollatorForSupervisedDataset"]

TRAINABLE_TEMPLATES = ("v1", "vicuna_v1", "llava_v1", "plain")
_ROLES = ("human", "gpt")


class DataError(ValueError):
    """A training sample or data file that cannot be used, named by its id."""


def load_records(path: str) -> list[dict]:
    """Read a LLaVA JSON file (a list) or JSON lines; malformed files raise ``DataError``."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a list of samples, got {type(records).__name__}")
    return records


def _sample_name(record: Any, index: int) -> str:
    ident = record.get("id") if isinstance(record, dict) else None
    return f"sample {ident!r} (#{index})" if ident is not None else f"sample #{index}"


def _check_record(record: Any, index: int) -> None:
    name = _sample_name(record, index)
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or not record["conversations"]:
        raise DataError(f"{name}: needs a non-empty 'conversations' list")
    turns = record["conversations"]
    for turn_index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"{name}: turn {turn_index} must be {{'from': 'human'|'gpt', 'value': str}}")
        if turn["from"] != _ROLES[turn_index % 2]:
            raise DataError(f"{name}: turns must alternate human, gpt, ... (turn {turn_index} is {turn['from']!r})")
    markers = [turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in turns]
    if "image" in record:
        if not isinstance(record["image"], str):
            raise DataError(f"{name}: 'image' must be one file name (multi-image samples are not supported)")
        if markers[0] != 1 or sum(markers) != 1:
            raise DataError(
                f"{name} has an image but {sum(markers)} <image> markers (expected exactly one, in the first "
                "human turn)"
            )
    elif sum(markers):
        raise DataError(f"{name} has {sum(markers)} <image> marker(s) but no 'image'")


def validate_records(
    records: Sequence[dict], image_folder: str | None, skip_missing_images: bool = False
) -> tuple[list[dict], list[str]]:
    """Check every sample's structure and image file up front.

    Returns the usable samples and the names of those skipped for a missing image (only
    with ``skip_missing_images``; otherwise a missing image raises, naming the sample).
    """
    kept, skipped = [], []
    for index, record in enumerate(tqdm(records, desc="checking data", disable=len(records) < 10000)):
        _check_record(record, index)
        if "image" in record:
            path = os.path.join(image_folder or "", record["image"])
            if not os.path.isfile(path):
                if skip_missing_images:
                    skipped.append(_sample_name(record, index))
                    continue
                raise DataError(
                    f"{_sample_name(record, index)}: image file not found: {path} "
                    "(fix --image_folder, or pass --skip_missing_images to drop such samples)"
                )
        kept.append(record)
    if skipped:
        logger.warning("skipped %d samples with missing images, e.g. %s", len(skipped), skipped[:5])
    return kept, skipped


def _move_image_to_front(value: str, use_im_start_end: bool) -> str:
    """Upstream's placement: the image opens the first human turn, then a newline."""
    text = value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    image = DEFAULT_IMAGE_TOKEN
    if use_im_start_end:
        image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return f"{image}\n{text}"


@dataclass
class EncodedSample:
    input_ids: torch.Tensor
    labels: torch.Tensor


def encode_conversation(
    record: dict, tokenizer, template: str, max_length: int | None = None, use_im_start_end: bool = False,
    name: str = "sample",
) -> EncodedSample:
    """Token ids and labels of one sample; only assistant replies (with ``</s>``) are targets."""
    if template not in TRAINABLE_TEMPLATES:
        raise ValueError(f"--version {template!r} cannot be trained; use one of {TRAINABLE_TEMPLATES}")
    conv = get_conv_template(template)
    turns = record["conversations"]
    if template == "plain":
        if len(turns) != 2:
            raise DataError(f"{name}: the plain template takes one human and one gpt turn")
        image = DEFAULT_IMAGE_TOKEN if "image" in record else ""
        conv.append_message(conv.roles[0], image)
        conv.append_message(conv.roles[1], turns[1]["value"])
    else:
        for index, turn in enumerate(turns):
            value = turn["value"]
            if index == 0 and "image" in record:
                value = _move_image_to_front(value, use_im_start_end)
            conv.append_message(conv.roles[index % 2], value)
    text, spans = conv.render()
    ids, offsets = tokenizer_image_token_with_offsets(text, tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        inside = []
        for i, (a, b) in enumerate(offsets):
            if a >= start and b <= end and b > a:
                inside.append(i)
            elif a < start < b or a < end < b:
                raise DataError(f"{name}: token {i} ({a}-{b}) straddles the reply at {start}-{end}")
        if not inside:
            raise DataError(f"{name}: the reply at characters {start}-{end} has no tokens")
        decoded = tokenizer.decode([ids[i] for i in inside]).strip()
        expected = text[start:end].strip()
        if decoded.replace(" ", "") != expected.replace(" ", ""):
            raise DataError(f"{name}: reply tokens decode to {decoded!r}, expected {expected!r}")
        for i in inside:
            labels[i] = ids[i]
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedSample(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


class LazySupervisedDataset(Dataset):
    """LLaVA JSON data, validated at start, tokenised and image-processed on access.

    ``max_length`` truncates the token ids (the model truncates again after splicing the
    image features, to ``config.tokenizer_model_max_length``).
    """

    def __init__(self, data_path: str, tokenizer, template: str, image_folder: str | None, image_processor,
                 model_config, max_length: int | None = None, skip_missing_images: bool = False):
        records = load_records(data_path)
        if template not in TRAINABLE_TEMPLATES:
            raise ValueError(f"--version {template!r} cannot be trained; use one of {TRAINABLE_TEMPLATES}")
        self.records, self.skipped = validate_records(records, image_folder, skip_missing_images)
        if not self.records:
            raise DataError(f"{data_path}: no usable samples")
        self.tokenizer = tokenizer
        self.template = template
        self.image_folder = image_folder
        self.image_processor = image_processor
        self.model_config = model_config
        self.max_length = max_length
        self._warned_empty: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Upstream's grouping key: words (+128 with an image), negative for text-only samples."""
        lengths = []
        for record in self.records:
            words = sum(len(turn["value"].split()) for turn in record["conversations"])
            lengths.append(words + 128 if "image" in record else -words)
        return lengths

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        name = _sample_name(record, index)
        encoded = encode_conversation(
            record, self.tokenizer, self.template, self.max_length,
            getattr(self.model_config, "mm_use_im_start_end", False), name,
        )
        if (encoded.labels != IGNORE_INDEX).sum() == 0 and name not in self._warned_empty:
            self._warned_empty.add(name)
            logger.warning("%s: truncation to %s tokens left no reply to learn", name, self.max_length)
        item = {"input_ids": encoded.input_ids, "labels": encoded.labels}
        if "image" in record:
            image = load_image(os.path.join(self.image_folder or "", record["image"]))
            item["image"] = process_images([image], self.image_processor, self.model_config)[0]
        return item


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads a batch; images are listed in row order (text-only rows have none)."""

    pad_token_id: int

    def __call__(self, instances: Sequence[dict]) -> dict:
        length = max(len(x["input_ids"]) for x in instances)
        batch = len(instances)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        for row, instance in enumerate(instances):
            n = len(instance["input_ids"])
            input_ids[row, :n] = instance["input_ids"]
            labels[row, :n] = instance["labels"]
            attention_mask[row, :n] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [x["image"] for x in instances if "image" in x]
        if images:
            out["images"] = torch.stack(images)
        return out
