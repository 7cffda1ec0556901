"""LLaVA instruction data: upstream's JSON format, read lazily, masked by character spans.

A sample is ``{"id", "image" (optional, relative to --image_folder), "conversations":
[{"from": "human"|"gpt", "value": ...}, ...]}`` with ``<image>`` in the first human turn
when there is an image. The conversation is rendered with the template, tokenised once
with offsets, and a token is a target exactly when its characters lie inside an assistant
reply (with its ``</s>``): no per-piece length arithmetic, so nothing can silently drift
out of line. A token straddling a reply's boundary, or a reply whose tokens do not decode
back to it, is an error naming the sample.

Before training, one pass over the data (``check_records``) finds every sample that would
fail or teach nothing: a missing or undecodable image, and a sample that
``--model_max_length`` would cut badly once each ``<image>`` marker has become the vision
tower's features (all its replies cut off, or an image's features cut in two).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..cli import InputError
from ..constants import (
    DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX,
)
from ..conversation import get_conv_template
from ..mm_utils import ImageLoadError, check_image, load_image, process_images, tokenizer_image_token_with_offsets

logger = logging.getLogger(__name__)

__all__ = ["DataError", "LengthCheck", "DataCheck", "load_records", "image_problem", "splice_problem",
           "check_records", "validate_records", "encode_conversation", "LazySupervisedDataset",
           "DataCollatorForSupervisedDataset"]

TRAINABLE_TEMPLATES = ("v1", "vicuna_v1", "llava_v1", "plain")
_ROLES = ("human", "gpt")
MAX_REPORTED = 10  # bad samples collected before the check stops and raises


class DataError(InputError):
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


def image_problem(path: str) -> str | None:
    """Why the image at ``path`` cannot be used, or None (``check_image`` with cut JPEGs
    decoded: a truncated PNG or JPEG fails, one with trailing bytes passes)."""
    try:
        check_image(path, decode_cut_jpeg=True)
    except ImageLoadError as error:
        cause = error.__cause__
        if cause is None:
            return str(error)  # image file not found: ...
        return f"image cannot be decoded: {path} ({type(cause).__name__}: {cause})"
    return None


def splice_problem(ids: Sequence[int], labels: Sequence[int], max_length: int | None, image_tokens: int) -> str | None:
    """What truncation to ``max_length`` would break once every image marker in ``ids`` has
    become ``image_tokens`` features (as the model splices them, keeping the first
    ``max_length`` positions), or None: an image cut in two, every reply cut off, or an
    image dropped."""
    markers = [i for i, token in enumerate(ids) if token == IMAGE_TOKEN_INDEX]
    length = len(ids) + (image_tokens - 1) * len(markers)
    if max_length is None or length <= max_length:
        return None
    where = f"{length} tokens with {len(markers)} image(s) of {image_tokens} features"
    starts = [marker + (image_tokens - 1) * count for count, marker in enumerate(markers)]
    for start in starts:  # what the model refuses mid-run ("would cut an image in two")
        if start < max_length < start + image_tokens:
            return (f"{where}: --model_max_length {max_length} would cut an image in two (its features are "
                    f"tokens {start}-{start + image_tokens})")
    first_target = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first_target is not None:
        start = first_target + (image_tokens - 1) * sum(m < first_target for m in markers)
        if start >= max_length:
            return (f"{where}: --model_max_length {max_length} cuts off every reply (the first starts at "
                    f"token {start})")
    for start in starts:
        if start >= max_length:
            return f"{where}: --model_max_length {max_length} would drop an image (at token {start})"
    return None


@dataclass
class LengthCheck:
    """Tokenise a sample as training will and check it against ``max_length`` (see
    ``splice_problem``); ``image_tokens`` is the tower's ``num_patches`` (1: ids alone)."""

    tokenizer: Any
    template: str
    max_length: int | None = None
    image_tokens: int = 1
    use_im_start_end: bool = False

    def __call__(self, record: dict, name: str) -> tuple[int, str | None]:
        """The spliced length and the problem (None when the sample fits)."""
        ids, labels = _encode(record, self.tokenizer, self.template, self.use_im_start_end, name)
        markers = sum(token == IMAGE_TOKEN_INDEX for token in ids)
        length = len(ids) + (self.image_tokens - 1) * markers
        return length, splice_problem(ids, labels, self.max_length, self.image_tokens)


@dataclass
class DataCheck:
    """What ``check_records`` found: the usable samples, the names of those dropped (with
    why), and the spliced length of every usable sample (when lengths were checked)."""

    kept: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


class BadSamples:
    """The bad samples of one check pass (every data format's): each dropped into ``check``'s
    skipped list under ``skip_bad_samples`` (a missing image also under
    ``skip_missing_images``), else kept to raise, together, at the ``MAX_REPORTED``-th or at
    ``finish``."""

    def __init__(self, check: DataCheck, total: int, skip_missing_images: bool, skip_bad_samples: bool):
        self.check, self.total = check, total
        self.skip_missing_images, self.skip_bad_samples = skip_missing_images, skip_bad_samples
        self.problems: list[tuple[str, str]] = []

    def add(self, name: str, kind: str, text: str, index: int) -> None:
        """Sample ``name`` (the ``index``-th record) has a problem of ``kind``, said in ``text``."""
        if self.skip_bad_samples or (kind == "missing image" and self.skip_missing_images):
            self.check.skipped.append(name)
            self.check.reasons.append(f"{name}: {text}")
            return
        self.problems.append((kind, f"{name}: {text}"))
        if len(self.problems) >= MAX_REPORTED:
            _raise_problems(self.problems, stopped_at=index + 1, total=self.total)

    def finish(self) -> None:
        """Raise what was found; log what was dropped."""
        if self.problems:
            _raise_problems(self.problems)
        if self.check.skipped:
            logger.warning("dropped %d of %d samples, e.g. %s", len(self.check.skipped), self.total,
                           "; ".join(self.check.reasons[:5]))


def check_records(
    records: Sequence[dict], image_folder: str | None, skip_missing_images: bool = False,
    skip_bad_samples: bool = False, lengths: LengthCheck | None = None,
) -> DataCheck:
    """Check every sample once, up front: structure (always fatal), the image file (there
    and decodable) and, with ``lengths``, the tokens after splicing.

    A bad sample is dropped with ``skip_bad_samples`` (a missing image also with
    ``skip_missing_images``); otherwise the check stops at the ``MAX_REPORTED``-th bad
    sample (or the end) and raises one ``DataError`` naming them.
    """
    result = DataCheck()
    bad = BadSamples(result, len(records), skip_missing_images, skip_bad_samples)
    for index, record in enumerate(tqdm(records, desc="checking data", disable=len(records) < 10000)):
        _check_record(record, index)
        name = _sample_name(record, index)
        problem = _image_problem(record, image_folder)
        length = None
        if problem is None and lengths is not None:
            length, text = lengths(record, name)
            problem = ("too long", text) if text else None
        if problem is None:
            result.kept.append(record)
            if length is not None:
                result.lengths.append(length)
            continue
        bad.add(name, *problem, index)
    bad.finish()
    return result


def image_problem_kind(path: str) -> tuple[str, str] | None:
    """``(kind, text)`` of the image at ``path`` (``missing image`` or ``undecodable image``), or
    ``None`` when it opens."""
    problem = image_problem(path)
    if problem is None:
        return None
    return ("missing image" if problem.startswith("image file not found") else "undecodable image"), problem


def _image_problem(record: dict, image_folder: str | None) -> tuple[str, str] | None:
    if "image" not in record:
        return None
    return image_problem_kind(os.path.join(image_folder or "", record["image"]))


def _raise_problems(problems: list[tuple[str, str]], stopped_at: int | None = None, total: int = 0):
    for _, text in problems:
        logger.error("%s", text)
    if all(kind == "missing image" for kind, _ in problems):
        hint = ("fix --image_folder, or pass --skip_missing_images True (or --skip_bad_samples True) to drop "
                "such samples")
    else:
        hint = "pass --skip_bad_samples True to drop such samples"
    if len(problems) == 1:
        raise DataError(f"{problems[0][1]} ({hint})")
    count = f"{len(problems)} bad samples"
    if stopped_at is not None:
        count = f"at least {len(problems)} bad samples (the first {stopped_at} of {total} checked)"
    shown = "; ".join(text for _, text in problems[:3])
    more = f"; and {len(problems) - 3} more (logged above)" if len(problems) > 3 else ""
    raise DataError(f"{count} ({hint}): {shown}{more}")


def validate_records(
    records: Sequence[dict], image_folder: str | None, skip_missing_images: bool = False,
    skip_bad_samples: bool = False, lengths: LengthCheck | None = None,
) -> tuple[list[dict], list[str]]:
    """``check_records`` as (usable samples, names of the dropped ones)."""
    result = check_records(records, image_folder, skip_missing_images, skip_bad_samples, lengths)
    return result.kept, result.skipped


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
    ids, labels = _encode(record, tokenizer, template, use_im_start_end, name)
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedSample(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def _encode(record: dict, tokenizer, template: str, use_im_start_end: bool, name: str) -> tuple[list[int], list[int]]:
    """Untruncated token ids and labels (lists) of one sample."""
    if template not in TRAINABLE_TEMPLATES:
        raise InputError(f"--version {template!r} cannot be trained; use one of {TRAINABLE_TEMPLATES}")
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
    i = 0  # one pass: the spans and the token offsets both run left to right
    for start, end in spans:
        while i < len(offsets) and offsets[i][1] <= start:
            i += 1
        inside = []
        while i < len(offsets) and offsets[i][0] < end:
            a, b = offsets[i]
            if a < start < b or a < end < b:
                raise DataError(f"{name}: token {i} ({a}-{b}) straddles the reply at {start}-{end}")
            if b > a:
                inside.append(i)
            i += 1
        if not inside:
            raise DataError(f"{name}: the reply at characters {start}-{end} has no tokens")
        decoded = tokenizer.decode([ids[i] for i in inside]).strip()
        expected = text[start:end].strip()
        if decoded.replace(" ", "") != expected.replace(" ", ""):
            raise DataError(f"{name}: reply tokens decode to {decoded!r}, expected {expected!r}")
        for i in inside:
            labels[i] = ids[i]
    return ids, labels


class LazySupervisedDataset(Dataset):
    """LLaVA JSON data, checked at start (``check_records``), tokenised and image-processed on
    access.

    ``max_length`` truncates the token ids (the model truncates again after splicing the
    image features, to ``config.tokenizer_model_max_length``); ``image_tokens`` is the number
    of features each ``<image>`` becomes (the tower's ``num_patches``), so that the check
    sees the spliced lengths. ``lengths`` holds the spliced length of every sample.
    """

    def __init__(self, data_path: str, tokenizer, template: str, image_folder: str | None, image_processor,
                 model_config, max_length: int | None = None, skip_missing_images: bool = False,
                 image_tokens: int = 1, skip_bad_samples: bool = False):
        records = load_records(data_path)
        if template not in TRAINABLE_TEMPLATES:
            raise InputError(f"--version {template!r} cannot be trained; use one of {TRAINABLE_TEMPLATES}")
        use_im_start_end = getattr(model_config, "mm_use_im_start_end", False)
        check = check_records(records, image_folder, skip_missing_images, skip_bad_samples,
                              LengthCheck(tokenizer, template, max_length, image_tokens, use_im_start_end))
        self.records, self.skipped, self.lengths = check.kept, check.skipped, check.lengths
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
