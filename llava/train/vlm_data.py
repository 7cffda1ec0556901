"""Instruction data for transformers' own VLMs (Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision).

Two record formats, mixed freely in one file (a JSON list or JSON lines):

* LLaVA's: ``{"id", "image": "a.png" | ["a.png", "b.png"], "conversations": [{"from":
  "human"|"gpt", "value": ...}, ...]}``, images placed at ``<image>`` markers in the human
  turns (in order; without any marker all images open the first human turn, as
  ``llava.model.vlm.user_content`` does);
* the processors' chat format: ``{"id", "messages": [{"role": "system"|"user"|"assistant",
  "content": str | [{"type": "image"} | {"type": "text", "text": ...}, ...]}, ...],
  "images": ["a.png", ...]}`` (a string content may place images with ``<image>`` markers).

Image paths are relative to ``--image_folder``. The prompt is the model's own chat template
(``processor.apply_chat_template``). Labels by segments, with no ``{% generation %}`` markers
needed: for every assistant message ``k`` the template renders ``messages[:k]`` with the
generation prompt (where the answer starts) and ``messages[:k + 1]`` (where the turn ends;
its trailing whitespace is not part of the answer), each of which must be a prefix of the
full conversation's render. The render is cut at those points into ``[prompt, answer 1,
between, answer 2, ..., rest]``, the processor runs once on that list of texts with all the
sample's images (it expands each image's placeholder in order across the list), and the ids
are concatenated: the ids of the answer segments (the reply and the template's end-of-turn
token) are the targets, every other id (system prompt, user turns, image tokens, the role
headers, padding) is ``-100``. Before training every sample is checked once
(``check_vlm_records``): structure, images there and decodable, the segments' token ids
equal to the full render's (a reply boundary inside a token is an error naming the sample),
and, where the image processor says how many tokens an image of a given size becomes (the
Qwen family), the sequence length against ``--model_max_length`` and every image's token
count (``DataCheck.lengths`` / ``VlmDataset.image_tokens``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ..constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from ..mm_utils import load_image
from ..model.vlm import user_content
from .data import BadSamples, DataCheck, DataError, _sample_name, image_problem_kind, load_records


__all__ = ["VlmSample", "VlmEncoded", "sample_messages", "split_segments", "encode_vlm_sample", "image_token_count",
           "check_vlm_records", "VlmDataset", "VlmDataCollator"]

_ROLES = {"human": "user", "gpt": "assistant"}
# keys of a processor's output that run along the token sequence (padded by the collator)
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class VlmSample:
    """One record as chat-template messages and the image files they place, in order."""

    name: str
    messages: list[dict]
    images: list[str]

    @property
    def answers(self) -> list[str]:
        """The assistant texts, in order."""
        return [_text_of(m["content"]) for m in self.messages if m["role"] == "assistant"]


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _image_parts(content) -> int:
    if isinstance(content, str):
        return content.count(DEFAULT_IMAGE_TOKEN)
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")


def _paths(value, name: str, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{name}: {key!r} must be one file name or a list of them")


def sample_messages(record: Any, index: int) -> VlmSample:
    """The record (either format, see the module docstring) as chat messages; a malformed
    one raises ``DataError`` naming it."""
    name = _sample_name(record, index)
    if isinstance(record, dict) and "messages" in record:
        return _chat_record(record, name)
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or not record["conversations"]:
        raise DataError(f"{name}: needs a non-empty 'conversations' list (LLaVA's format) or a 'messages' list "
                        "(the chat format)")
    turns = record["conversations"]
    for turn_index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"{name}: turn {turn_index} must be {{'from': 'human'|'gpt', 'value': str}}")
        if turn["from"] != ("human", "gpt")[turn_index % 2]:
            raise DataError(f"{name}: turns must alternate human, gpt, ... (turn {turn_index} is {turn['from']!r})")
    images = _paths(record.get("image"), name, "image")
    markers = [turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in turns]
    if any(count for turn, count in zip(turns, markers) if turn["from"] == "gpt"):
        raise DataError(f"{name}: an <image> marker in a gpt turn (images go in human turns)")
    if sum(markers) and sum(markers) != len(images):
        raise DataError(f"{name} has {len(images)} image(s) but {sum(markers)} <image> markers")
    if not images and sum(markers):
        raise DataError(f"{name} has {sum(markers)} <image> marker(s) but no 'image'")
    messages = []
    for turn_index, (turn, count) in enumerate(zip(turns, markers)):
        if turn["from"] == "gpt":
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"]}]})
            continue
        images_here = count if sum(markers) else (len(images) if turn_index == 0 else 0)
        messages.append({"role": "user", "content": user_content(turn["value"], images_here)})
    _check_turns(messages, name)
    return VlmSample(name, messages, images)


def _chat_record(record: dict, name: str) -> VlmSample:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{name}: 'messages' must be a non-empty list")
    images = _paths(record.get("images"), name, "images")
    out = []
    for index, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant")
                or not isinstance(message.get("content"), (str, list))):
            raise DataError(f"{name}: message {index} must be {{'role': 'system'|'user'|'assistant', "
                            "'content': str or a list of parts}")
        content = message["content"]
        if isinstance(content, list) and not all(
                isinstance(part, dict) and (part.get("type") == "image" or
                                            (part.get("type") == "text" and isinstance(part.get("text"), str)))
                for part in content):
            raise DataError(f"{name}: message {index}'s parts must be {{'type': 'image'}} or "
                            "{'type': 'text', 'text': str}")
        count = _image_parts(content)
        if count and message["role"] != "user":
            raise DataError(f"{name}: message {index} ({message['role']}) holds an image (images go in user messages)")
        if message["role"] == "user" and isinstance(content, str):
            content = user_content(content, count)
        elif message["role"] == "user":
            content = [{"type": "image"} if part["type"] == "image" else {"type": "text", "text": part["text"]}
                       for part in content]
        elif isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({"role": message["role"], "content": content})
    count = sum(_image_parts(m["content"]) for m in out)
    if count != len(images):
        raise DataError(f"{name} places {count} image(s) in its messages but lists {len(images)} in 'images'")
    _check_turns(out, name)
    return VlmSample(name, out, images)


def _check_turns(messages: list[dict], name: str) -> None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise DataError(f"{name}: a system message may only come first")
    for index, role in enumerate(body):
        if role != ("user", "assistant")[index % 2]:
            raise DataError(f"{name}: messages must alternate user, assistant, ... after an optional system one "
                            f"(message {index + len(roles) - len(body)} is {role!r})")
    if not body or body[-1] != "assistant":
        raise DataError(f"{name}: the last message must be the assistant's (there is nothing to learn after it)")


# ---------------------------------------------------------------------- segments and labels
def split_segments(processor, sample: VlmSample) -> tuple[list[str], list[bool]]:
    """The full render cut into segments, and which are assistant answers (targets).

    For every assistant message ``k``: the answer starts where ``messages[:k]`` rendered with
    the generation prompt ends, and ends where ``messages[:k + 1]`` ends (its trailing
    whitespace stripped). Both must be prefixes of the full render, and the answer segment
    must hold the reply's text; otherwise ``DataError`` naming the sample."""
    render = processor.apply_chat_template
    full = render(sample.messages, tokenize=False)
    cuts, at = [], 0
    for k, message in enumerate(sample.messages):
        if message["role"] != "assistant":
            continue
        prompt = render(sample.messages[:k], tokenize=False, add_generation_prompt=True)
        turn = render(sample.messages[:k + 1], tokenize=False).rstrip()
        for what, prefix in (("the prompt before", prompt), ("the conversation up to", turn)):
            if not full.startswith(prefix):
                raise DataError(f"{sample.name}: the chat template's render of {what} assistant message {k} is not "
                                "a prefix of the whole conversation's, so its answer cannot be located")
        start, end = len(prompt), len(turn)
        reply = _text_of(message["content"]).strip()
        if start < at or end <= start or reply not in full[start:end]:
            raise DataError(f"{sample.name}: the chat template's assistant message {k} ({full[start:end]!r}) does "
                            f"not hold its reply {reply!r}")
        cuts.append((start, end))
        at = end
    segments, is_answer, at = [], [], 0
    for start, end in cuts:
        if start > at:
            segments.append(full[at:start])
            is_answer.append(False)
        segments.append(full[start:end])
        is_answer.append(True)
        at = end
    if at < len(full):
        segments.append(full[at:])
        is_answer.append(False)
    return segments, is_answer


def _text_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def check_segment_tokens(processor, sample: VlmSample, segments: list[str], is_answer: list[bool]) -> list[int]:
    """Token ids of the segments (images not expanded), checked against the full render's:
    a segment boundary inside a token, or an answer without tokens, raises ``DataError``."""
    tokenizer = processor.tokenizer
    pieces = _text_ids(tokenizer, segments)
    ids = [token for piece in pieces for token in piece]
    if ids != _text_ids(tokenizer, ["".join(segments)])[0]:
        raise DataError(f"{sample.name}: the tokens of the segments differ from those of the whole conversation "
                        "(a token straddles the start or end of a reply)")
    for piece, answer in zip(pieces, is_answer):
        if answer and not piece:
            raise DataError(f"{sample.name}: an assistant reply has no tokens")
    return ids


@dataclass
class VlmEncoded:
    """The processor's output of one sample (tensors without a batch axis for the token
    keys) and its labels."""

    inputs: dict
    labels: torch.Tensor


def _as_tensor(value):
    """A processor output as one tensor; a list of per-image arrays is stacked, LLaVA-NeXT's
    crops zero-padded to the most (the model keeps each image's own by ``image_sizes``)."""
    if torch.is_tensor(value):
        return value
    if isinstance(value, list) and value and not isinstance(value[0], (int, float)):
        parts = [torch.as_tensor(v) for v in value]
        most = max(p.shape[0] for p in parts) if parts[0].dim() else 0
        parts = [torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) if p.dim() and p.shape[0] < most
                 else p for p in parts]
        return torch.stack(parts)
    return torch.as_tensor(value)


def encode_vlm_sample(processor, sample: VlmSample, images: Sequence[Image.Image]) -> VlmEncoded:
    """The processor's inputs of ``sample`` with ``images`` (PIL, in order) and its labels
    (see the module docstring): one processor call on the list of segments."""
    segments, is_answer = split_segments(processor, sample)
    # the sample's images as one group: processors that treat several images of one prompt
    # differently (LLaVA-OneVision's batch_num_images) see them as the prompt's own
    out = processor(text=segments, images=[list(images)] if images else None, padding=False,
                    add_special_tokens=False)
    pieces = out["input_ids"]
    inputs, labels = {}, []
    for piece, answer in zip(pieces, is_answer):
        labels += list(piece) if answer else [IGNORE_INDEX] * len(piece)
    for key, value in out.items():
        if key in TOKEN_KEYS:
            inputs[key] = torch.tensor([token for piece in value for token in piece], dtype=torch.long)
        else:
            inputs[key] = _as_tensor(value)
    return VlmEncoded(inputs, torch.tensor(labels, dtype=torch.long))


def image_token_count(processor, width: int, height: int) -> int | None:
    """Vision tokens an image of ``width x height`` pixels becomes, where the image processor
    says (the Qwen family: its patches over the merge size squared); else ``None``."""
    image_processor = getattr(processor, "image_processor", None)
    count = getattr(image_processor, "get_number_of_image_patches", None)
    merge = getattr(image_processor, "merge_size", None)
    if count is None or not merge:
        return None
    return int(count(height, width, {})) // int(merge) ** 2


# ---------------------------------------------------------------------- the check pass
def check_vlm_records(records: Sequence[Any], processor, image_folder: str | None, max_length: int | None = None,
                      skip_missing_images: bool = False, skip_bad_samples: bool = False,
                      ) -> tuple[DataCheck, list[VlmSample], list[list[int]]]:
    """Check every record once, up front, as ``data.check_records`` does for LLaVA's data:
    structure and the chat template's segments (always fatal), every image file (there and
    decodable) and, where the image processor gives image sizes in tokens, the length after
    the images' tokens are placed against ``max_length``. Returns the check (kept records,
    skipped names, lengths where known), the kept samples and each kept sample's image
    token counts (empty where unknown)."""
    result, samples, counts = DataCheck(), [], []
    bad = BadSamples(result, len(records), skip_missing_images, skip_bad_samples)
    for index, record in enumerate(tqdm(records, desc="checking data", disable=len(records) < 10000)):
        sample = sample_messages(record, index)
        segments, is_answer = split_segments(processor, sample)
        ids = check_segment_tokens(processor, sample, segments, is_answer)
        problem, tokens = None, []
        for image in sample.images:
            path = os.path.join(image_folder or "", image)
            problem = image_problem_kind(path)
            if problem is not None:
                break
            with Image.open(path) as opened:
                tokens.append(image_token_count(processor, *opened.size))
        length = None
        if problem is None and all(t is not None for t in tokens):
            length = len(ids) + sum(t - 1 for t in tokens)  # each image's one placeholder becomes its tokens
            if max_length is not None and length > max_length:
                problem = ("too long", f"{length} tokens with {len(tokens)} image(s) of {tokens} tokens: longer "
                                       f"than --model_max_length {max_length} (an image or a reply would be cut)")
        if problem is None:
            result.kept.append(record)
            samples.append(sample)
            counts.append([t for t in tokens if t is not None])
            if length is not None:
                result.lengths.append(length)
            continue
        bad.add(sample.name, *problem, index)
    bad.finish()
    return result, samples, counts


class VlmDataset(Dataset):
    """Records of either format, checked at start (``check_vlm_records``), encoded by the
    model's processor on access. ``image_tokens``: per kept sample, its images' token counts
    where the image processor gives them (empty lists otherwise)."""

    def __init__(self, data_path: str, processor, image_folder: str | None, max_length: int | None = None,
                 skip_missing_images: bool = False, skip_bad_samples: bool = False):
        records = load_records(data_path)
        check, self.samples, self.image_tokens = check_vlm_records(
            records, processor, image_folder, max_length, skip_missing_images, skip_bad_samples)
        self.records, self.skipped, self.lengths = check.kept, check.skipped, check.lengths
        if not self.records:
            raise DataError(f"{data_path}: no usable samples")
        self.processor = processor
        self.image_folder = image_folder
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        """Upstream's grouping key: words (+128 with an image), negative for text-only samples."""
        lengths = []
        for sample in self.samples:
            words = sum(len(_text_of(m["content"]).split()) for m in sample.messages)
            lengths.append(words + 128 if sample.images else -words)
        return lengths

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        images = [load_image(os.path.join(self.image_folder or "", path)) for path in sample.images]
        encoded = encode_vlm_sample(self.processor, sample, images)
        length = len(encoded.labels)
        if self.max_length is not None and length > self.max_length:  # where the check could not know sizes
            raise DataError(f"{sample.name}: {length} tokens, longer than --model_max_length {self.max_length} "
                            "(an image or a reply would be cut; pass --skip_bad_samples True or raise the limit)")
        return {**encoded.inputs, "labels": encoded.labels}


@dataclass
class VlmDataCollator:
    """Right-pads the token keys (``input_ids`` with ``pad_token_id``, ``labels`` with -100,
    the masks with 0) and joins every other key along its first axis in row order: Qwen's
    flattened ``pixel_values`` patches and ``image_grid_thw`` rows; LLaVA-NeXT/OneVision's
    ``pixel_values`` (images x crops x C x H x W, the crops zero-padded to the batch's most,
    which the model drops again by ``image_sizes``) and ``image_sizes``. Rows without images
    add nothing."""

    pad_token_id: int
    token_pad: dict = field(default_factory=lambda: {"labels": IGNORE_INDEX})

    def __call__(self, instances: Sequence[dict]) -> dict:
        length = max(len(x["input_ids"]) for x in instances)
        out = {}
        for key in ("input_ids", "labels", *TOKEN_KEYS[1:]):
            if not any(key in x for x in instances):
                continue
            pad = self.pad_token_id if key == "input_ids" else self.token_pad.get(key, 0)
            rows = torch.full((len(instances), length), pad, dtype=torch.long)
            for row, x in enumerate(instances):
                rows[row, :len(x["input_ids"])] = x[key] if key in x else int(key == "attention_mask")
            out[key] = rows
        if "attention_mask" not in out:
            lengths = torch.tensor([len(x["input_ids"]) for x in instances])
            out["attention_mask"] = (torch.arange(length)[None] < lengths[:, None]).long()
        for key in dict.fromkeys(k for x in instances for k in x):
            if key in out or key in TOKEN_KEYS:
                continue
            parts = [x[key] for x in instances if key in x]
            out[key] = _join(parts)
        return out


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    if parts[0].dim() >= 3 and len({p.shape[1] for p in parts}) > 1:  # LLaVA-NeXT crops per image
        most = max(p.shape[1] for p in parts)
        parts = [torch.cat([p, p.new_zeros(p.shape[0], most - p.shape[1], *p.shape[2:])], 1) for p in parts]
    return torch.cat(parts, 0)
