"""ADSC fine-tuning of LLaVA-1.5: ``python -m llava.train.train`` (or the deepspeed launcher).

Upstream's flags (``--model_name_or_path --version --data_path --image_folder
--lora_enable --lora_r --lora_alpha --mm_projector_lr --model_max_length --bits ...``) plus
``--prune_layers``, ``--drop_ratio``/``--vision_token_budget``/``--budget_fraction``, ``--curriculum``
(``reverse``|``standard``|``direct``|``none``), ``--curriculum_factors``,
``--curriculum_phase_fractions``, ``--finetune_mode`` (``lora``|``full``),
``--attn_implementation``, ``--save_every_minutes`` and ``--skip_bad_samples``.

A checkpoint of transformers' own Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT or LLaVA-OneVision
(``llava.model.vlm.is_transformers_vlm``) is fine-tuned by ``llava.train.vlm_train`` with the
same flags, trainer and curriculum (its target: ``--budget_fraction`` or ``--drop_ratio``).

The run resumes from the newest ``checkpoint-*`` in ``--output_dir`` when there is one
(upstream's behaviour), including the curriculum phase of that step. Upstream's
invocations work too: ``python llava/train/train.py ...`` and ``deepspeed
llava/train/train_mem.py ...``. Bad input ends the command with one line ``error: ...``
and exit code 2 (the traceback with ``--debug``).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a file: see _run_as_file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under python -P
    import _run_as_file  # noqa: F401

import logging
import pathlib
from dataclasses import dataclass

import torch
import transformers

from adsc_patch import ScheduleError, compat, kept_tokens, vision_schedule
from adsc_patch.methods import get_method
from llava.cli import InputError, run_command
from llava.model import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.builder import (
    bnb_quantization_config, check_attention_implementation, flash_attention_missing, is_hf_llava, load_llava_config,
    load_tokenizer, read_config, resolve_checkpoint,
)
from llava.model.hub import resolve_pretrained
from llava.model.multimodal_encoder.clip_encoder import load_clip_image_processor
from llava.train.arguments import (
    ATTENTION_IMPLEMENTATIONS, AdscArguments, DataArguments, ModelArguments, TrainingArguments,
)
from llava.train.curriculum import CurriculumCallback, plan_curriculum
from llava.train.data import DataCollatorForSupervisedDataset, DataError, LazySupervisedDataset
from llava.train.trainer import LLaVATrainer, SaveEveryMinutesCallback, save_training_output, write_training_summary

logger = logging.getLogger("llava.train")

LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def parse_args(argv=None):
    """The four argument dataclasses; an unknown flag or a refused value raises ``InputError``."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, AdscArguments))
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except InputError:
        raise
    except ValueError as error:  # transformers' TrainingArguments refusing a combination of flags
        raise InputError(str(error)) from error
    if unknown:
        raise InputError(f"unrecognised arguments: {' '.join(unknown)}")
    return parsed


def resolve_attention(requested: str | None, preferred: str = "sdpa", cuda: bool | None = None) -> str:
    """The attention implementation to load: ``requested`` (``--attn_implementation``) when
    given, else ``preferred``, where an unusable ``flash_attention_2`` falls back to sdpa
    with a log line (train_mem.py's default). A requested flash_attention_2 without
    flash-attn raises ``MissingDependencyError``, without a CUDA GPU ``InputError``."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested is None:
        missing = flash_attention_missing(cuda) if preferred == "flash_attention_2" else None
        if missing:
            logger.info("attention: sdpa (flash_attention_2 needs %s)", missing)
            return "sdpa"
        requested = preferred
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise InputError(f"--attn_implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                         f"got {requested!r}")
    check_attention_implementation(requested, "--attn_implementation", cuda)
    return requested


def _dtype(training_args) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def _load_kwargs(training_args: TrainingArguments, attn_implementation: str) -> dict:
    """``from_pretrained`` keywords: dtype, attention and, with ``--bits 4/8``, the bitsandbytes
    settings (the vision tower, projector and ``lm_head`` stay unquantised)."""
    dtype = _dtype(training_args)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if training_args.bits in (4, 8):
        kwargs["quantization_config"] = bnb_quantization_config(
            training_args.bits, dtype, training_args.double_quant, training_args.quant_type
        )
        kwargs["device_map"] = {"": training_args.device}
    return kwargs


def build_model(model_args: ModelArguments, training_args: TrainingArguments, attn_implementation: str = "sdpa"):
    """The LLaVA model to train and its tokenizer.

    From a LLaVA checkpoint (upstream layout or llava-hf), or from a plain Llama checkpoint
    plus ``--vision_tower`` (upstream's stage 2; the projector from
    ``--pretrain_mm_mlp_adapter``, else freshly initialised). With ``--bits 4/8`` the
    language model is loaded quantised.
    """
    path = resolve_checkpoint(model_args.model_name_or_path, "--model_name_or_path")
    raw = read_config(path)
    if is_hf_llava(raw) and training_args.bits in (4, 8):
        raise InputError(f"--bits {training_args.bits} needs a checkpoint in upstream LLaVA layout; {path} is a "
                         "llava-hf (LlavaForConditionalGeneration) checkpoint")
    load_kwargs = _load_kwargs(training_args, attn_implementation)
    if is_hf_llava(raw):
        from llava.model.convert_hf import load_hf_llava

        model = load_hf_llava(path, **load_kwargs)
    elif raw.get("mm_vision_tower") or raw.get("vision_tower"):
        config = load_llava_config(path, vision_tower=model_args.vision_tower)
        model = LlavaLlamaForCausalLM.from_pretrained(path, config=config, **load_kwargs)
    else:
        if not model_args.vision_tower:
            raise InputError(f"{path} is a plain language model: pass --vision_tower to build a LLaVA on it")
        from transformers import CLIPVisionConfig

        tower = CLIPVisionConfig.from_pretrained(resolve_pretrained(model_args.vision_tower, "--vision_tower"))
        raw.pop("model_type", None)
        raw.pop("architectures", None)
        config = LlavaConfig(
            **{k: v for k, v in raw.items() if k not in ("transformers_version", "torch_dtype", "dtype")},
            architectures=["LlavaLlamaForCausalLM"],
            mm_vision_tower=os.path.abspath(model_args.vision_tower) if os.path.isdir(model_args.vision_tower)
            else model_args.vision_tower,
            mm_hidden_size=tower.hidden_size,
            mm_projector_type=model_args.mm_projector_type,
            mm_vision_select_layer=model_args.mm_vision_select_layer,
            mm_vision_select_feature=model_args.mm_vision_select_feature,
            mm_patch_merge_type=model_args.mm_patch_merge_type,
            mm_use_im_start_end=model_args.mm_use_im_start_end,
            mm_use_im_patch_token=model_args.mm_use_im_patch_token,
        )
        model = LlavaLlamaForCausalLM.from_pretrained(path, config=config, allow_missing_projector=True, **load_kwargs)
        if model_args.pretrain_mm_mlp_adapter:
            weights = torch.load(model_args.pretrain_mm_mlp_adapter, map_location="cpu", weights_only=True)
            projector = {k.split("mm_projector.", 1)[1]: v for k, v in weights.items() if "mm_projector." in k}
            model.model.mm_projector.load_state_dict(projector)
            logger.info("projector from %s", model_args.pretrain_mm_mlp_adapter)
        else:
            logger.warning("no --pretrain_mm_mlp_adapter: the projector starts from random weights")
    tokenizer = load_tokenizer(path)
    return model, tokenizer


def _method_prune_layers(adsc: AdscArguments, config) -> list[int]:
    """The prune layers of the fine-tune: given, else saved where they fit the method, else the
    method's default (ADSC's for adsc and pdrop, FastV's K for fastv, none before the language
    model)."""
    given = adsc.layers()
    rule = get_method(adsc.prune_method)
    if not rule.in_decoder:
        if given:
            raise InputError(f"--prune_method {adsc.prune_method} reduces the image before the language model: "
                             f"drop --prune_layers {adsc.prune_layers}")
        return []
    saved = list(config.prune_layers)
    return given or (saved if saved and rule.fits_layers(saved) else list(rule.default_layers(config.num_hidden_layers)))


def _target_budget(model, adsc: AdscArguments, layers: list[int]) -> float:
    schedule_n = model.get_vision_tower().num_patches
    n_layers = model.config.num_hidden_layers
    if adsc.vision_token_budget is not None:
        return float(adsc.vision_token_budget)
    if adsc.budget_fraction is not None:  # our images have one size: the fraction is a budget
        return adsc.budget_fraction * schedule_n
    if adsc.drop_ratio is not None and not layers:  # a pre-LLM method: tokens per image
        return float(kept_tokens(schedule_n, adsc.drop_ratio))
    if adsc.drop_ratio is not None:
        return vision_schedule(n_layers, schedule_n, layers, adsc.drop_ratio).average_tokens
    if model.config.prune_layers and model.config.drop_ratio > 0:
        return model.vision_schedule().average_tokens
    raise InputError("give --vision_token_budget (e.g. 192) or --drop_ratio: the target of the ADSC fine-tune "
                     "(or --curriculum none to train on all vision tokens, as upstream's recipe does)")


def _set_trainable(model, adsc: AdscArguments, model_args: ModelArguments, training_args: TrainingArguments):
    """Freeze per the mode; returns (model to hand to the Trainer, output mode)."""
    model.requires_grad_(False)
    if model_args.tune_mm_mlp_adapter:
        model.model.mm_projector.requires_grad_(True)
        return model, "projector"
    if adsc.finetune_mode == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if training_args.bits in (4, 8):  # QLoRA: norms and the unquantised modules in fp32, LM frozen
            with compat.peft_without_alias_warnings():
                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=training_args.activation_checkpointing,
                    gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs,
                )

        lora = LoraConfig(
            r=training_args.lora_r,
            lora_alpha=training_args.lora_alpha,
            lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias,
            target_modules=LORA_TARGETS,
            modules_to_save=None if training_args.freeze_mm_mlp_adapter else ["mm_projector"],
            task_type="CAUSAL_LM",
        )
        with compat.peft_without_alias_warnings():
            peft_model = get_peft_model(model, lora)
        peft_model.print_trainable_parameters()
        return peft_model, "lora"
    model.model.requires_grad_(not model_args.freeze_backbone)
    model.lm_head.requires_grad_(not model_args.freeze_backbone)
    model.get_vision_tower().requires_grad_(False)
    model.model.mm_projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    return model, "full"


@dataclass
class TrainingResult:
    output_dir: str
    model: LlavaLlamaForCausalLM  # the trained model (LoRA not merged: inside ``trainer.model``)
    trainer: LLaVATrainer
    dataset: LazySupervisedDataset


def train(argv=None, attn_implementation: str | None = None) -> str:
    """Run a fine-tune, return the output folder. ``attn_implementation``: the attention
    when ``--attn_implementation`` is not given (default sdpa; ``flash_attention_2`` as
    upstream's train_mem passes it falls back to sdpa without flash-attn or CUDA)."""
    return run_training(argv, attn_implementation).output_dir


def main(argv=None) -> str:
    """The command line: bad input ends it with ``error: ...`` and exit code 2."""
    return run_command(train, argv)


def _check_flags(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                 adsc: AdscArguments) -> None:
    """Refuse contradicting flags and a missing data file before any weight is loaded."""
    adsc.validate()
    if training_args.lora_enable and adsc.finetune_mode == "full":
        raise InputError("--lora_enable True contradicts --finetune_mode full")
    if training_args.bits in (4, 8):
        if adsc.finetune_mode == "full" or model_args.tune_mm_mlp_adapter:
            what = "--finetune_mode full" if adsc.finetune_mode == "full" else "--tune_mm_mlp_adapter True"
            raise InputError(f"--bits {training_args.bits} (QLoRA) trains LoRA adapters on a frozen quantised "
                             f"language model: it cannot be combined with {what}")
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise InputError(f"--bits {training_args.bits} does not work with DeepSpeed ZeRO-3: use ZeRO-2 "
                             "(--deepspeed scripts/zero2.json)")
    if not data_args.data_path:
        raise InputError("give --data_path (LLaVA JSON or JSON lines)")
    if not os.path.isfile(data_args.data_path):
        raise DataError(f"data file not found: {data_args.data_path}")


def run_training(argv=None, attn_implementation: str | None = None) -> TrainingResult:
    """Parse upstream-style arguments, fine-tune, write the output."""
    model_args, data_args, training_args, adsc = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if training_args.should_log else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    _check_flags(model_args, data_args, training_args, adsc)
    vlm = _is_transformers_vlm(model_args.model_name_or_path)
    if vlm:
        from llava.train import vlm_train

        vlm_train.refuse_absolute_budget(model_args.model_name_or_path, adsc)
    attention = resolve_attention(model_args.attn_implementation, attn_implementation or "sdpa",
                                  cuda=torch.cuda.is_available() and not training_args.use_cpu)
    if training_args.activation_checkpointing and training_args.activation_checkpointing_kwargs is None:
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}

    # Before any weight is made: LoRA adapters (and a fresh projector) are initialised from
    # the global RNG, which torch seeds at random in every process; the Trainer seeds only later.
    transformers.set_seed(training_args.seed)
    if vlm:  # Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision: transformers' own classes
        timed = _timed_saves(training_args)
        return vlm_train.run_vlm_training(model_args, data_args, training_args, adsc, attention,
                                          _load_kwargs(training_args, attention), [timed] if timed else [])
    model, tokenizer = build_model(model_args, training_args, attention)
    logger.info("attention: %s%s", model.config._attn_implementation,
                f", language model in {training_args.bits} bit" if training_args.bits in (4, 8) else "")
    config = model.config
    config.use_cache = False
    config.tokenizer_model_max_length = training_args.model_max_length
    config.tokenizer_padding_side = "right"
    config.image_aspect_ratio = data_args.image_aspect_ratio
    config.conv_mode = "vicuna_v1" if model_args.version in ("v1", "vicuna_v1") else model_args.version
    config.prune_selection = adsc.prune_selection
    config.prune_method = adsc.prune_method

    tower = model.get_vision_tower()
    factors, fractions = adsc.factors(), adsc.fractions()
    if factors:
        layers = _method_prune_layers(adsc, config)
        target = _target_budget(model, adsc, layers)

        def plan(total_steps: int):
            return plan_curriculum(target, factors, fractions, total_steps,
                                   lambda budget: model.solve_schedule(budget, layers))

        try:  # solve every phase now: an infeasible budget fails before any data is read
            budgets = [f"{p.budget:.2f} (average {p.schedule.average_tokens:.2f})" for p in plan(len(factors))]
        except ScheduleError as error:
            raise ScheduleError(f"the curriculum's budgets are infeasible for this model: {error}") from error
        logger.info("%s curriculum, prune method %s, over prune layers %s: budgets %s", adsc.curriculum,
                    adsc.prune_method, layers, ", ".join(budgets))
    else:
        model.configure_pruning(prune_layers=[], drop_ratio=0.0)
        logger.info("no curriculum: training on all vision tokens")

    dataset = LazySupervisedDataset(
        data_args.data_path, tokenizer, model_args.version, data_args.image_folder,
        load_clip_image_processor(tower.vision_tower_name), config,
        max_length=training_args.model_max_length, skip_missing_images=data_args.skip_missing_images,
        image_tokens=tower.num_patches, skip_bad_samples=data_args.skip_bad_samples,
    )
    trained, mode = _set_trainable(model, adsc, model_args, training_args)
    curriculum = CurriculumCallback(model, plan) if factors else None
    callbacks = [c for c in (curriculum, _timed_saves(training_args)) if c is not None]
    trainer = LLaVATrainer(
        model=trained,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id),
        callbacks=callbacks or None,
    )
    resume = training_args.resume_from_checkpoint
    if resume is None and list(pathlib.Path(training_args.output_dir).glob("checkpoint-*")):
        resume = True
    trainer.train(resume_from_checkpoint=resume)

    if factors:
        final = model.configure_pruning(prune_layers=layers, vision_token_budget=target)
        config.vision_token_budget = target
    else:
        final = model.vision_schedule()
    config.use_cache = True
    save_training_output(trainer, model, tokenizer, mode)
    write_training_summary(
        trainer, mode, len(dataset.skipped), target_budget=config.vision_token_budget,
        final_schedule=final.describe(),
        curriculum=[p.describe(len(factors)) for p in curriculum.phases] if curriculum else [])
    return TrainingResult(training_args.output_dir, model, trainer, dataset)


def _is_transformers_vlm(model_name_or_path: str) -> bool:
    """Whether the checkpoint is one of transformers' own VLMs (``llava.model.vlm``); a path
    that does not resolve is left to the LLaVA path's own error."""
    from llava.model.vlm import is_transformers_vlm

    try:
        return is_transformers_vlm(model_name_or_path)
    except InputError:
        return False


def _timed_saves(training_args: TrainingArguments) -> SaveEveryMinutesCallback | None:
    """A checkpoint every ``--save_every_minutes`` as well (off with 0 or ``--save_strategy no``)."""
    if not training_args.save_every_minutes or training_args.save_strategy == "no":
        return None
    logger.info("a checkpoint every %g minutes as well", training_args.save_every_minutes)
    return SaveEveryMinutesCallback(training_args.save_every_minutes)


if __name__ == "__main__":
    main()
