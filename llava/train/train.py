"""ADSC fine-tuning of LLaVA-1.5: ``python -m llava.train.train`` (or the deepspeed launcher).

Upstream's flags (``--model_name_or_path --version --data_path --image_folder
--lora_enable --lora_r --lora_alpha --mm_projector_lr --model_max_length ...``) plus
``--prune_layers``, ``--drop_ratio``/``--vision_token_budget``, ``--curriculum``
(``reverse``|``standard``|``direct``), ``--curriculum_factors``,
``--curriculum_phase_fractions`` and ``--finetune_mode`` (``lora``|``full``).

The run resumes from the newest ``checkpoint-*`` in ``--output_dir`` when there is one
(upstream's behaviour), including the curriculum phase of that step.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
from dataclasses import dataclass

import torch
import transformers

from adsc_patch import ScheduleError, default_prune_layers, vision_schedule

from ..model import LlavaConfig, LlavaLlamaForCausalLM
from ..model.builder import is_hf_llava, read_config, load_llava_config, load_tokenizer
from ..model.multimodal_encoder.clip_encoder import load_clip_image_processor
from .arguments import AdscArguments, DataArguments, ModelArguments, TrainingArguments
from .curriculum import CurriculumCallback, plan_curriculum
from .data import DataCollatorForSupervisedDataset, LazySupervisedDataset
from .trainer import LLaVATrainer, save_training_output

logger = logging.getLogger("llava.train")

LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def parse_args(argv=None):
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, AdscArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def _dtype(training_args) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def build_model(model_args: ModelArguments, training_args: TrainingArguments):
    """The LLaVA model to train and its tokenizer.

    From a LLaVA checkpoint (upstream layout or llava-hf), or from a plain Llama checkpoint
    plus ``--vision_tower`` (upstream's stage 2; the projector from
    ``--pretrain_mm_mlp_adapter``, else freshly initialised).
    """
    path = model_args.model_name_or_path
    dtype = _dtype(training_args)
    raw = read_config(path)
    if is_hf_llava(raw):
        from ..model.convert_hf import load_hf_llava

        model = load_hf_llava(path, dtype=dtype)
    elif raw.get("mm_vision_tower") or raw.get("vision_tower"):
        config = load_llava_config(path, vision_tower=model_args.vision_tower)
        model = LlavaLlamaForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    else:
        if not model_args.vision_tower:
            raise ValueError(f"{path} is a plain language model: pass --vision_tower to build a LLaVA on it")
        from transformers import CLIPVisionConfig

        tower = CLIPVisionConfig.from_pretrained(model_args.vision_tower)
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
        model = LlavaLlamaForCausalLM.from_pretrained(path, config=config, dtype=dtype, allow_missing_projector=True)
        if model_args.pretrain_mm_mlp_adapter:
            weights = torch.load(model_args.pretrain_mm_mlp_adapter, map_location="cpu", weights_only=True)
            projector = {k.split("mm_projector.", 1)[1]: v for k, v in weights.items() if "mm_projector." in k}
            model.model.mm_projector.load_state_dict(projector)
            logger.info("projector from %s", model_args.pretrain_mm_mlp_adapter)
        else:
            logger.warning("no --pretrain_mm_mlp_adapter: the projector starts from random weights")
    tokenizer = load_tokenizer(path)
    return model, tokenizer


def _target_budget(model, adsc: AdscArguments, layers: list[int]) -> float:
    schedule_n = model.get_vision_tower().num_patches
    n_layers = model.config.num_hidden_layers
    if adsc.vision_token_budget is not None:
        return float(adsc.vision_token_budget)
    if adsc.drop_ratio is not None:
        return vision_schedule(n_layers, schedule_n, layers, adsc.drop_ratio).average_tokens
    if model.config.prune_layers and model.config.drop_ratio > 0:
        return model.vision_schedule().average_tokens
    raise ValueError("give --vision_token_budget (e.g. 192) or --drop_ratio: the target of the ADSC fine-tune")


def _set_trainable(model, adsc: AdscArguments, model_args: ModelArguments, training_args: TrainingArguments):
    """Freeze per the mode; returns (model to hand to the Trainer, output mode)."""
    model.requires_grad_(False)
    if model_args.tune_mm_mlp_adapter:
        model.model.mm_projector.requires_grad_(True)
        return model, "projector"
    if adsc.finetune_mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=training_args.lora_r,
            lora_alpha=training_args.lora_alpha,
            lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias,
            target_modules=LORA_TARGETS,
            modules_to_save=None if training_args.freeze_mm_mlp_adapter else ["mm_projector"],
            task_type="CAUSAL_LM",
        )
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


def train(argv=None) -> str:
    """The command line: run a fine-tune, return the output folder."""
    return run_training(argv).output_dir


def run_training(argv=None) -> TrainingResult:
    """Parse upstream-style arguments, fine-tune, write the output."""
    model_args, data_args, training_args, adsc = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if training_args.should_log else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    adsc.validate()
    if training_args.lora_enable and adsc.finetune_mode == "full":
        raise ValueError("--lora_enable True contradicts --finetune_mode full")
    if training_args.bits != 16:
        raise ValueError("--bits 4/8 (QLoRA) is not supported: train in 16 or 32 bit")
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}

    # Before any weight is made: LoRA adapters (and a fresh projector) are initialised from
    # the global RNG, which torch seeds at random in every process; the Trainer seeds only later.
    transformers.set_seed(training_args.seed)
    model, tokenizer = build_model(model_args, training_args)
    config = model.config
    config.use_cache = False
    config.tokenizer_model_max_length = training_args.model_max_length
    config.tokenizer_padding_side = "right"
    config.image_aspect_ratio = data_args.image_aspect_ratio
    config.conv_mode = "vicuna_v1" if model_args.version in ("v1", "vicuna_v1") else model_args.version
    config.prune_selection = adsc.prune_selection

    tower = model.get_vision_tower()
    factors, fractions = adsc.factors(), adsc.fractions()
    if factors:
        layers = adsc.layers() or list(config.prune_layers) or list(default_prune_layers(config.num_hidden_layers))
        target = _target_budget(model, adsc, layers)

        def plan(total_steps: int):
            return plan_curriculum(target, factors, fractions, total_steps, config.num_hidden_layers,
                                   tower.num_patches, layers)

        try:  # solve every phase now: an infeasible budget fails before any data is read
            budgets = [f"{p.budget:.2f} (average {p.schedule.average_tokens:.2f})" for p in plan(len(factors))]
        except ScheduleError as error:
            raise ScheduleError(f"the curriculum's budgets are infeasible for this model: {error}") from error
        logger.info("%s curriculum over prune layers %s: budgets %s", adsc.curriculum, layers, ", ".join(budgets))
    else:
        model.configure_pruning(prune_layers=[], drop_ratio=0.0)
        logger.info("no curriculum: training on all vision tokens")

    dataset = LazySupervisedDataset(
        data_args.data_path, tokenizer, model_args.version, data_args.image_folder,
        load_clip_image_processor(tower.vision_tower_name), config,
        max_length=training_args.model_max_length, skip_missing_images=data_args.skip_missing_images,
    )
    trained, mode = _set_trainable(model, adsc, model_args, training_args)
    curriculum = CurriculumCallback(model, plan) if factors else None
    trainer = LLaVATrainer(
        model=trained,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id),
        callbacks=[curriculum] if curriculum else None,
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
    if training_args.should_save:
        summary = {
            "mode": mode,
            "target_budget": config.vision_token_budget,
            "final_schedule": final.describe(),
            "curriculum": [p.describe(len(factors)) for p in curriculum.phases] if curriculum else [],
            "steps": trainer.state.global_step,
            "seed": training_args.seed,
            "train_loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        }
        with open(os.path.join(training_args.output_dir, "adsc_training.json.tmp"), "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(os.path.join(training_args.output_dir, "adsc_training.json.tmp"),
                   os.path.join(training_args.output_dir, "adsc_training.json"))
    return TrainingResult(training_args.output_dir, model, trainer, dataset)


if __name__ == "__main__":
    train()
