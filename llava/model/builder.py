"""``load_pretrained_model``: every LLaVA-1.5 checkpoint layout, decided by the files present.

Layouts (``checkpoint_format``; ``"auto"`` detects them in this order):

``lora``       ``adapter_config.json`` (+ ``non_lora_trainables.bin`` with the projector) on
               top of ``model_base``; merged after loading.
``hf``         transformers' ``LlavaForConditionalGeneration`` (llava-hf): ``config.json``
               with ``model_type: llava`` and ``text_config``; converted into our class.
``full``       a complete LLaVA checkpoint (``model*.safetensors`` or ``pytorch_model*.bin``).
``projector``  ``mm_projector.bin`` only (pre-training output) on top of ``model_base``.

A wrong combination (LoRA without base, base with a full checkpoint, base and adapter of
different shapes, no projector anywhere) is refused with a message naming what is missing;
the projector is never silently re-initialised.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os

import torch

from adsc_patch import compat

from ..cli import InputError, MissingDependencyError
from ..constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from .fingerprint import weights_fingerprint
from .hub import ResolutionError, looks_like_hub_id, resolve_pretrained
from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from .multimodal_encoder.builder import resolve_vision_tower
from .multimodal_encoder.clip_encoder import load_clip_image_processor

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMATS",
    "CheckpointError",
    "bnb_quantization_config",
    "detect_checkpoint_format",
    "is_hf_llava",
    "read_config",
    "load_llava_config",
    "load_pretrained_model",
    "load_tokenizer",
    "resolve_checkpoint",
    "check_attention_implementation",
    "flash_attention_missing",
    "write_tower_relative",
]

CHECKPOINT_FORMATS = ("auto", "full", "lora", "projector", "hf")
_SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


class CheckpointError(InputError):
    """A checkpoint folder (or base + checkpoint pair) that cannot be loaded as asked."""


def read_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path} has no config.json")
    with open(config_file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error


def is_hf_llava(config: dict) -> bool:
    return config.get("model_type") == "llava" and (
        "text_config" in config or "LlavaForConditionalGeneration" in config.get("architectures", [])
    )


def _has_full_weights(path: str) -> bool:
    patterns = ("model*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any(glob.glob(os.path.join(path, p)) for p in patterns)


def _projector_file(path: str) -> str | None:
    for name in ("mm_projector.safetensors", "mm_projector.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def detect_checkpoint_format(model_path: str) -> str:
    """``lora``, ``hf``, ``full`` or ``projector`` from the files in ``model_path``."""
    if os.path.isfile(os.path.join(model_path, "adapter_config.json")):
        return "lora"
    config = read_config(model_path)
    if is_hf_llava(config):
        return "hf"
    if _has_full_weights(model_path):
        return "full"
    if _projector_file(model_path):
        return "projector"
    raise CheckpointError(
        f"{model_path} holds no weights LLaVA can load: expected model*.safetensors / "
        "pytorch_model*.bin (full checkpoint), adapter_config.json (LoRA) or mm_projector.bin"
    )


def resolve_checkpoint(path: str, what: str = "model path") -> str:
    """The local folder of a checkpoint given as a folder or a hub id (from the Hugging Face
    cache when offline; see ``llava.model.hub``)."""
    try:
        return resolve_pretrained(path, what)
    except ResolutionError as error:
        raise CheckpointError(str(error)) from None


def write_tower_relative(config_dir: str, model_dir: str | None = None) -> None:
    """Rewrite ``config_dir/config.json`` so that an ``mm_vision_tower`` naming a local folder
    is relative to ``model_dir`` (default ``config_dir``), the folder the model will live in:
    a model moved together with its tower (a playground run, a checkpoints folder) still loads.
    Hub ids and relative names stay as they are."""
    config_file = os.path.join(config_dir, "config.json")
    data = read_config(config_dir)
    tower = data.get("mm_vision_tower")
    if not tower or not os.path.isabs(tower) or not os.path.isdir(tower):
        return
    data["mm_vision_tower"] = os.path.relpath(tower, os.path.abspath(model_dir or config_dir))
    tmp = config_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, config_file)


def load_llava_config(path: str, vision_tower: str | None = None, search_dirs: tuple[str, ...] = ()) -> LlavaConfig:
    """Read an upstream-style LLaVA ``config.json`` (``model_type`` ``llava_llama`` or the
    pre-2024 ``llava``) and resolve ``mm_vision_tower`` to a local folder when one exists
    beside the checkpoint (or in ``search_dirs``)."""
    data = read_config(path)
    if is_hf_llava(data):
        raise CheckpointError(f"{path} is a llava-hf checkpoint; it is converted by load_pretrained_model")
    if data.get("model_type") not in ("llava_llama", "llava", "llama", None):
        raise CheckpointError(f"{path}: model_type {data.get('model_type')!r} is not a LLaVA-Llama config")
    data["model_type"] = "llava_llama"
    data.pop("transformers_version", None)
    if vision_tower is not None:
        data["mm_vision_tower"] = vision_tower
    tower = data.get("mm_vision_tower") or data.get("vision_tower")
    if tower:
        for directory in (path, *search_dirs):
            resolved = resolve_vision_tower(tower, directory)
            if resolved != tower:
                tower = os.path.abspath(resolved)
                break
        data["mm_vision_tower"] = tower
    config = LlavaConfig.from_dict(data)
    config._name_or_path = path
    return config


def _check_same_shape(adapter_config: LlavaConfig, base_path: str, what: str) -> None:
    base = read_config(base_path)
    base_text = base.get("text_config", base)
    mismatched = [
        f"{field}: {getattr(adapter_config, field)} vs base {base_text.get(field)}"
        for field in _SHAPE_FIELDS
        if base_text.get(field) is not None and getattr(adapter_config, field) != base_text.get(field)
    ]
    if mismatched:
        raise CheckpointError(
            f"the {what} was trained on a different base than {base_path}: " + "; ".join(mismatched)
        )


def _load_state_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _strip_peft_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base_model.model.model.mm_projector.0.weight`` -> ``model.mm_projector.0.weight``."""
    out = {}
    for key, value in state.items():
        if key.startswith("base_model.model."):
            key = key[len("base_model.model."):]
        out[key] = value
    return out


def _load_extra_weights(model, state: dict[str, torch.Tensor], source: str) -> set[str]:
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise CheckpointError(f"{source} holds weights this model does not have: {unknown[:8]}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
    return set(state)


def _ensure_projector(model, loaded_keys: set[str], missing_before: set[str], source: str) -> None:
    projector_keys = {k for k in model.state_dict() if k.startswith("model.mm_projector")}
    still_missing = (projector_keys & missing_before) - loaded_keys
    if still_missing:
        raise CheckpointError(
            f"no projector weights for {sorted(still_missing)}: neither the base model nor {source} has them"
        )


def _add_multimodal_tokens(tokenizer, model) -> None:
    config = model.config
    new_tokens = []
    if config.mm_use_im_patch_token:
        new_tokens.append(DEFAULT_IMAGE_PATCH_TOKEN)
    if config.mm_use_im_start_end:
        new_tokens += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    if new_tokens:
        tokenizer.add_tokens(new_tokens, special_tokens=True)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            logger.info("resizing embeddings to %d for %s", len(tokenizer), new_tokens)
            model.resize_token_embeddings(len(tokenizer))


def load_tokenizer(*paths: str):
    """The tokenizer of the first folder that has one, by the class its
    ``tokenizer_config.json`` names (``AutoTokenizer`` would let a ``model_type: llava``
    config pick a generic class that tokenises differently)."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    for path in paths:
        if path and any(
            os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.model", "tokenizer.json")
        ):
            tokenizer_class = None
            config_file = os.path.join(path, "tokenizer_config.json")
            if os.path.isfile(config_file):
                with open(config_file) as f:
                    name = json.load(f).get("tokenizer_class")
                tokenizer_class = tokenizer_class_from_name(name) if name else None
            tokenizer = (tokenizer_class or AutoTokenizer).from_pretrained(path)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.unk_token
            return tokenizer
    raise CheckpointError(f"no tokenizer (tokenizer.model or tokenizer.json) in {[p for p in paths if p]}")


def flash_attention_missing(cuda: bool | None = None) -> str | None:
    """What ``flash_attention_2`` lacks here ("the flash-attn package", "a CUDA GPU"), or ``None``."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package"
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return "a CUDA GPU"
    return None


def check_attention_implementation(requested: str | None, flag: str = "attn_implementation",
                                   cuda: bool | None = None) -> None:
    """Refuse ``flash_attention_2`` without flash-attn (``MissingDependencyError``) or without a
    CUDA GPU (``InputError``), in one line naming ``flag``."""
    if requested != "flash_attention_2":
        return
    missing = flash_attention_missing(cuda)
    if missing == "the flash-attn package":
        raise MissingDependencyError(f"{flag} flash_attention_2 needs the flash-attn package "
                                     "(pip install flash-attn --no-build-isolation); or use sdpa")
    if missing:
        raise InputError(f"{flag} flash_attention_2 needs a CUDA GPU; use sdpa")


def _pick_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; pass device='cpu'")
    return device


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = "auto",
    device: str | None = None,
    use_flash_attn: bool = False,
    attn_implementation: str | None = None,
    checkpoint_format: str = "auto",
    vision_tower: str | None = None,
    **kwargs,
):
    """Load a LLaVA-1.5 checkpoint as ``(tokenizer, model, image_processor, context_len)``.

    Args:
        model_path: checkpoint folder (or hub id when online).
        model_base: base language model or LLaVA checkpoint for ``lora`` and ``projector``
            layouts; must be ``None`` for ``full`` and ``hf``.
        model_name: kept for upstream compatibility; only used in log messages (the layout
            is decided by the files, never by the folder name).
        load_8bit, load_4bit: bitsandbytes quantisation of the language model.
        device_map: accelerate device map on CUDA (default ``"auto"``); ignored on CPU.
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available.
        use_flash_attn: shorthand for ``attn_implementation="flash_attention_2"``.
        attn_implementation: ``"eager"``, ``"sdpa"`` (default) or ``"flash_attention_2"``.
        checkpoint_format: ``"auto"`` or one of ``full``, ``lora``, ``projector``, ``hf``.
        vision_tower: override ``mm_vision_tower`` (e.g. a local copy of the CLIP model).
        **kwargs: passed to ``from_pretrained`` (e.g. ``dtype``/``torch_dtype``).
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    model_path = resolve_checkpoint(model_path, "model path")
    base_name = model_base
    if model_base is not None:
        model_base = resolve_checkpoint(model_base, "model base")
    layout = detect_checkpoint_format(model_path) if checkpoint_format == "auto" else checkpoint_format
    logger.info("loading %s as a %s checkpoint%s", model_name or model_path, layout,
                f" on base {model_base}" if model_base else "")
    if layout in ("lora", "projector") and model_base is None:
        hint = ""
        if layout == "lora":
            with open(os.path.join(model_path, "adapter_config.json")) as f:
                recorded = json.load(f).get("base_model_name_or_path")
            hint = f" (the adapter records base {recorded!r})" if recorded else ""
        raise CheckpointError(
            f"{model_path} is a {'LoRA adapter' if layout == 'lora' else 'projector-only'} output; "
            f"give its base with --model-base (model_base= in Python){hint}"
        )
    if layout in ("full", "hf") and model_base is not None:
        raise CheckpointError(
            f"{model_path} is a complete ({layout}) checkpoint; model_base is only for LoRA or "
            "projector-only outputs"
        )

    device = _pick_device(device)
    if use_flash_attn:
        attn_implementation = "flash_attention_2"
    check_attention_implementation(attn_implementation, cuda=device.startswith("cuda"))
    dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    load_kwargs = dict(dtype=dtype, **kwargs)
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if load_8bit and load_4bit:
        raise CheckpointError("choose load_8bit or load_4bit, not both")
    if device.startswith("cuda"):
        load_kwargs["device_map"] = device_map if device_map is not None else {"": device}
    if load_8bit or load_4bit:
        load_kwargs["quantization_config"] = bnb_quantization_config(8 if load_8bit else 4, dtype)
        load_kwargs.setdefault("device_map", {"": device})

    if layout == "hf":
        from .convert_hf import load_hf_llava

        model, image_processor_path = load_hf_llava(model_path, **load_kwargs), model_path
        tokenizer = load_tokenizer(model_path)
    else:
        search = (model_base,) if model_base else ()
        config = load_llava_config(model_path, vision_tower=vision_tower, search_dirs=search)
        if layout == "full":
            model = LlavaLlamaForCausalLM.from_pretrained(model_path, config=config, **load_kwargs)
        else:
            if layout == "lora":
                _warn_if_other_base(model_path, base_name, model_base)
            model = _load_on_base(layout, model_path, model_base, config, load_kwargs)
        tokenizer = load_tokenizer(model_path, model_base)
        image_processor_path = model.get_vision_tower().vision_tower_name
    _add_multimodal_tokens(tokenizer, model)
    if not device.startswith("cuda") and not (load_8bit or load_4bit):
        model.to(device)
    model.eval()
    image_processor = load_clip_image_processor(image_processor_path)
    context_len = getattr(model.config, "max_sequence_length", None) or model.config.tokenizer_model_max_length or 2048
    return tokenizer, model, image_processor, context_len


def _load_on_base(layout: str, model_path: str, model_base: str, config: LlavaConfig, load_kwargs: dict):
    what = "LoRA adapter" if layout == "lora" else "projector"
    _check_same_shape(config, model_base, what)
    base_vocab = read_config(model_base).get("vocab_size")
    if base_vocab is not None and base_vocab != config.vocab_size:
        raise CheckpointError(
            f"the {what} at {model_path} expects a vocabulary of {config.vocab_size}, "
            f"base {model_base} has {base_vocab}"
        )
    model, info = LlavaLlamaForCausalLM.from_pretrained(
        model_base, config=config, allow_missing_projector=True, output_loading_info=True, **load_kwargs
    )
    missing_before = set(info.get("missing_keys", ()))
    if layout == "projector":
        source = _projector_file(model_path)
        state = {k if k.startswith("model.") else f"model.{k}": v for k, v in _load_state_file(source).items()}
        loaded = _load_extra_weights(model, state, source)
        _ensure_projector(model, loaded, missing_before, source)
        return model

    loaded: set[str] = set()
    for name in ("non_lora_trainables.safetensors", "non_lora_trainables.bin"):
        source = os.path.join(model_path, name)
        if os.path.isfile(source):
            loaded = _load_extra_weights(model, _strip_peft_prefix(_load_state_file(source)), source)
            break
    _ensure_projector(model, loaded, missing_before, f"{model_path} (non_lora_trainables)")
    from peft import PeftModel

    try:
        with compat.peft_without_alias_warnings():
            model = PeftModel.from_pretrained(model, model_path)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"the LoRA adapter at {model_path} does not fit base {model_base}: {error}") from error
    logger.info("merging LoRA weights")
    return model.merge_and_unload()


# Kept in full precision when the language model is quantised (upstream's choice): our names,
# llava-hf's / LLaVA-NeXT's / OneVision's, and Qwen-VL's tower with its merger. Full module-name prefixes, because transformers 5 matches skip names from
# the start of a module's name (or as its last part), not anywhere inside it.
UNQUANTISED_MODULES = ("model.mm_projector", "model.multi_modal_projector", "model.vision_tower", "model.visual",
                       "lm_head")


def bnb_quantization_config(bits: int, compute_dtype: torch.dtype, double_quant: bool = True, quant_type: str = "nf4"):
    """bitsandbytes settings for a ``bits``-bit (4 or 8) language model; the vision tower,
    projector and ``lm_head`` stay in ``compute_dtype``. Raises ``MissingDependencyError``
    without bitsandbytes."""
    if bits not in (4, 8):
        raise InputError(f"quantisation is 4 or 8 bits, got {bits}")
    if quant_type not in ("nf4", "fp4"):
        raise InputError(f"4-bit quant_type is nf4 or fp4, got {quant_type!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(f"{bits}-bit loading needs bitsandbytes: pip install 'llava-adsc[train]'")
    from transformers import BitsAndBytesConfig

    skip = list(UNQUANTISED_MODULES)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_type=quant_type,
        llm_int8_skip_modules=skip,
    )


def _warn_if_other_base(adapter_path: str, base_given: str, base_path: str) -> None:
    """Warn when the LoRA adapter records a base (a hub id or an existing folder) other than
    the one it is being loaded on: a base of the same shape loads silently but is wrong
    (vicuna-7b instead of llava-v1.5-7b)."""
    with open(os.path.join(adapter_path, "adapter_config.json")) as f:
        recorded = json.load(f).get("base_model_name_or_path")
    if not recorded or recorded == base_given:
        return
    if os.path.isdir(recorded):
        recorded_path = recorded
    elif not looks_like_hub_id(recorded):
        return  # a folder of another machine: nothing to compare with
    else:
        try:
            recorded_path = resolve_pretrained(recorded, "recorded base", local_only=True)
        except ResolutionError:
            recorded_path = None
    if recorded_path is not None and (os.path.realpath(recorded_path) == os.path.realpath(base_path)
                                      or weights_fingerprint(recorded_path) == weights_fingerprint(base_path)):
        return  # the same folder, or a copy of the same weights

    logger.warning(
        "the LoRA adapter %s was trained on base %r but is being loaded on %r: if that is not the same "
        "model, its answers will be wrong", adapter_path, recorded, base_given,
    )
