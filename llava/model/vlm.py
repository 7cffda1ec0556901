"""transformers' own VLMs in our entry points: Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision.

A checkpoint of these (a folder, a hub id from the Hugging Face cache, or a LoRA adapter of
our fine-tune on top of its base) loads as transformers' own class
(``AutoModelForImageTextToText``) with its own processor; prompts are built by the model's
own chat template and processor (never LLaVA's templates); pruning is a ``PruningSpec`` per
call (``adsc_patch.pruning``). What a fine-tune of ours trained with is recorded beside its
weights in ``adsc_pruning.json`` (``RECORDED_PRUNING_FILE``) and is the checkpoint's default.

Conventions: a conversation is a list of ``(user, assistant)`` turns, the last one's
assistant ``None`` for a prompt; a user text places its images at ``<image>`` markers, else
all of the turn's images go before the text (as LLaVA's data does).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from adsc_patch import PruningSpec, PruningTrace, compat, pruning

from ..cli import InputError
from ..constants import DEFAULT_IMAGE_TOKEN
from .hub import ResolutionError, resolve_pretrained

logger = logging.getLogger(__name__)

__all__ = ["TRANSFORMERS_VLM_TYPES", "RECORDED_PRUNING_FILE", "LoadedVlm", "VlmReply", "is_transformers_vlm",
           "checkpoint_model_type", "load_processor", "load_transformers_vlm", "chat_messages", "user_content",
           "encode_prompts", "generate_replies", "mean_vision_tokens_per_row", "read_recorded_spec",
           "write_recorded_spec"]

TRANSFORMERS_VLM_TYPES = ("qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision")
RECORDED_PRUNING_FILE = "adsc_pruning.json"


class VlmCheckpointError(InputError):
    """A transformers VLM checkpoint (or adapter + base pair) that cannot be loaded as asked."""


def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise VlmCheckpointError(f"{path} is not valid JSON: {error}") from None


def _resolve(path: str, what: str) -> str:
    try:
        return resolve_pretrained(path, what)
    except ResolutionError as error:
        raise VlmCheckpointError(str(error)) from None


def checkpoint_model_type(model_path: str, model_base: str | None = None) -> str | None:
    """The ``model_type`` of the checkpoint at ``model_path`` (resolved as a folder or a cached
    hub id); for a LoRA adapter folder, its base's (``model_base``, else the one it records).
    ``None`` when no config says."""
    path = _resolve(model_path, "model path")
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        return _read_json(config_file).get("model_type")
    adapter_file = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_file):
        base = model_base or _read_json(adapter_file).get("base_model_name_or_path")
        if base:
            base_config = os.path.join(_resolve(base, "model base"), "config.json")
            if os.path.isfile(base_config):
                return _read_json(base_config).get("model_type")
    return None


def is_transformers_vlm(model_path: str, model_base: str | None = None) -> bool:
    """Whether the checkpoint is one of ``TRANSFORMERS_VLM_TYPES`` (loaded by this module)."""
    return checkpoint_model_type(model_path, model_base) in TRANSFORMERS_VLM_TYPES


def read_recorded_spec(path: str) -> PruningSpec | None:
    """The spec a fine-tune of ours recorded in ``path/adsc_pruning.json`` (``None`` without one)."""
    file = os.path.join(path, RECORDED_PRUNING_FILE)
    return PruningSpec.read(_read_json(file)) if os.path.isfile(file) else None


def write_recorded_spec(path: str, spec: PruningSpec) -> None:
    """Record ``spec`` in ``path/adsc_pruning.json`` (atomically)."""
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, RECORDED_PRUNING_FILE)
    with open(file + ".tmp", "w") as f:
        json.dump(spec.to_dict(), f, indent=2)
    os.replace(file + ".tmp", file)


def load_processor(path: str):
    """The checkpoint's own processor (``AutoProcessor``); where torchvision is missing, the
    same processor class built for images only (``compat.processor_without_video``)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    import transformers

    model_type = _read_json(os.path.join(path, "config.json")).get("model_type") \
        if os.path.isfile(os.path.join(path, "config.json")) else None
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise VlmCheckpointError(f"{path}: no processor class known for model_type {model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = tokenizer.chat_template
    template_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file) as f:
            template = f.read()
    settings_file = os.path.join(path, "processor_config.json")  # e.g. LLaVA-NeXT's num_image_tokens
    settings = _read_json(settings_file) if os.path.isfile(settings_file) else {}
    return compat.processor_without_video(getattr(transformers, name), AutoImageProcessor.from_pretrained(path),
                                          tokenizer, template, settings)


@dataclass
class LoadedVlm:
    """A loaded transformers VLM: ``model`` (eval mode), ``processor``, the ``recorded`` spec of
    our fine-tune (``None`` for a stock checkpoint) and the folder it came from."""

    model: object
    processor: object
    recorded: PruningSpec | None
    path: str

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def num_layers(self) -> int:
        from adsc_patch.adapters import adapter_for

        return adapter_for(self.model).num_layers(self.model)

    @property
    def context_length(self) -> int:
        text = getattr(self.model.config, "text_config", self.model.config)
        return int(getattr(text, "max_position_embeddings", None) or 4096)


def load_transformers_vlm(model_path: str, model_base: str | None = None, device: str | None = None,
                          dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                          load_8bit: bool = False, load_4bit: bool = False, device_map="auto") -> LoadedVlm:
    """Load a checkpoint of ``TRANSFORMERS_VLM_TYPES``: a complete folder (or cached hub id), or a
    LoRA adapter folder of our fine-tune on ``model_base`` (else the base it records), merged.
    Default dtype: float16 on CUDA, float32 on CPU; 4/8-bit quantises the language model only."""
    from transformers import AutoModelForImageTextToText

    from .builder import _pick_device, bnb_quantization_config

    path = _resolve(model_path, "model path")
    adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
    base = None
    if adapter:
        base_name = model_base or _read_json(os.path.join(path, "adapter_config.json")).get("base_model_name_or_path")
        if not base_name:
            raise VlmCheckpointError(f"{path} is a LoRA adapter that records no base: give --model-base")
        base = _resolve(base_name, "model base")
    elif model_base is not None:
        raise VlmCheckpointError(f"{path} is a complete checkpoint; --model-base is only for a LoRA adapter")
    weights_from = base or path
    model_type = checkpoint_model_type(weights_from)
    if model_type not in TRANSFORMERS_VLM_TYPES:
        raise VlmCheckpointError(f"{weights_from}: model_type {model_type!r} is not one of {TRANSFORMERS_VLM_TYPES}")
    device = _pick_device(device)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    kwargs: dict = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device.startswith("cuda"):
        kwargs["device_map"] = device_map if device_map is not None else {"": device}
    if load_8bit or load_4bit:
        kwargs["quantization_config"] = bnb_quantization_config(8 if load_8bit else 4, dtype)
        kwargs.setdefault("device_map", {"": device})
    model = AutoModelForImageTextToText.from_pretrained(weights_from, **kwargs)
    if adapter:
        from peft import PeftModel

        try:
            with compat.peft_without_alias_warnings():
                model = PeftModel.from_pretrained(model, path).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as error:
            raise VlmCheckpointError(f"the LoRA adapter at {path} does not fit base {weights_from}: {error}") from error
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    has_processor = any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json"))
    processor = load_processor(path if has_processor else weights_from)
    recorded = read_recorded_spec(path)
    logger.info("loaded %s (%s)%s%s", path, type(model).__name__, f" on base {base}" if base else "",
                f"; fine-tuned with {recorded}" if recorded else "")
    return LoadedVlm(model, processor, recorded, path)


# ---------------------------------------------------------------------- prompts
def user_content(text: str, images: int) -> list[dict]:
    """A user message's content parts: ``images`` image parts at the ``<image>`` markers of
    ``text`` (all before the text when it has none); a marker count other than ``images`` is an
    ``InputError``."""
    markers = text.count(DEFAULT_IMAGE_TOKEN)
    if markers and markers != images:
        raise InputError(f"the text places {markers} {DEFAULT_IMAGE_TOKEN} marker(s) but {images} image(s) come with it")
    if not markers:
        parts = [{"type": "image"} for _ in range(images)]
        return parts + [{"type": "text", "text": text.strip()}]
    parts = []
    for index, piece in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if index:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def chat_messages(turns: Sequence[tuple[str, str | None]], images_per_turn: Sequence[int] | None = None) -> list[dict]:
    """The chat-template messages of ``turns`` (``(user, assistant)``; an assistant ``None``
    ends the list there); ``images_per_turn`` images go with each user turn (default: one
    with the first)."""
    counts = list(images_per_turn) if images_per_turn is not None else [1] + [0] * (len(turns) - 1)
    messages = []
    for (user, assistant), images in zip(turns, counts + [0] * (len(turns) - len(counts))):
        messages.append({"role": "user", "content": user_content(user, images)})
        if assistant is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return messages


def encode_prompts(loaded: LoadedVlm, conversations: Sequence[list[dict]], images: Sequence[Sequence]) -> dict:
    """The model inputs of a batch of chat-template ``conversations`` (each ending with a user
    turn) and their ``images`` (one list per conversation, in order): the model's own template
    with the generation prompt, its processor, left padding. Tensors on the model's device."""
    processor = loaded.processor
    if getattr(processor, "chat_template", None) is None:
        raise VlmCheckpointError(f"{loaded.path}: the processor has no chat template")
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
             for messages in conversations]
    flat = [image for group in images for image in group]
    inputs = processor(text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt")
    model = loaded.model
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value):
            value = value.to(model.device)
            if value.is_floating_point():
                value = value.to(model.dtype)
        out[key] = value
    return out


# ---------------------------------------------------------------------- generation
@dataclass
class VlmReply:
    """What ``generate_replies`` returns: the texts, the new tokens ``(B, new)``, the call's
    trace (``None`` unpruned) and ``generate``'s output."""

    texts: list[str]
    new_tokens: torch.Tensor
    trace: PruningTrace | None
    output: object


def generate_replies(loaded: LoadedVlm, inputs: dict, spec: PruningSpec | None, **generation) -> VlmReply:
    """``model.generate(**inputs, **generation)`` pruned by ``spec`` for this call only
    (``None`` or a spec that prunes nothing: the stock model)."""
    block = pruning(loaded.model, spec) if spec is not None and spec.enabled else nullcontext()
    generation.setdefault("pad_token_id", loaded.tokenizer.pad_token_id)
    with torch.inference_mode(), block as session:
        output = loaded.model.generate(**inputs, return_dict_in_generate=True, **generation)
    new = output.sequences[:, inputs["input_ids"].shape[1]:]
    texts = [text.strip() for text in loaded.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return VlmReply(texts, new, session.trace if session is not None else None, output)


def mean_vision_tokens_per_row(inputs: dict, image_token_id: int, trace: PruningTrace | None) -> list[float]:
    """Per prompt of a batch, its vision tokens per decoder layer averaged over the layers: what
    ``trace`` says ran (``None``: every layer saw all of them). Padding and text excluded."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    vision = (ids == image_token_id).sum(1)
    if trace is None:
        return [float(v) for v in vision]
    real = mask.sum(1) if mask is not None else torch.full_like(vision, ids.shape[1])
    text = real - vision
    # tokens_per_layer counts a row's real tokens (text + kept vision) in every layer
    return [float(trace.tokens_per_layer[row].float().mean() - text[row]) for row in range(ids.shape[0])]
