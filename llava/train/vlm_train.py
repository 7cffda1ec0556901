"""The ADSC fine-tune of transformers' own VLMs (Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision).

``python -m llava.train.train --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --budget_fraction
0.333 --prune_layers 2,6,12,20 ...`` comes here (``run_training`` branches when
``llava.model.vlm.is_transformers_vlm`` says so) with the same flags, trainer, curriculum,
checkpoints and resume as LLaVA-1.5's recipe:

* the model is ``AutoModelForImageTextToText.from_pretrained`` (``--bits 4/8``: the language
  model quantised, the vision tower, projector and ``lm_head`` not), pruned through
  ``adsc_patch.apply_adsc`` with a ``PruningSpec`` (a training forward with labels computes
  the loss over the pruned sequence);
* ``--finetune_mode lora``: LoRA on the text decoder's q/k/v/o/gate/up/down projections only
  (a pattern rooted at the language model's module name, so never the vision tower's), the
  projector trained in full (peft ``modules_to_save``: Qwen2.5-VL's ``model.visual.merger``,
  Qwen3-VL's merger and DeepStack mergers, LLaVA-NeXT/OneVision's
  ``model.multi_modal_projector``) unless ``--freeze_mm_mlp_adapter True``; ``full``: the
  language model (and ``lm_head``) and the projector; the vision tower is always frozen;
* the target is ``--budget_fraction`` (of each image's own tokens) or ``--drop_ratio``; an
  absolute ``--vision_token_budget`` is refused before any weight loads (images differ in
  size); without either, the checkpoint's recorded spec (``adsc_pruning.json``);
* the curriculum (``--curriculum reverse``: 0.8x, 0.9x, 1.0x the target fraction) follows the
  optimizer step (``CurriculumCallback``), each phase put into effect by ``apply_adsc`` with
  that phase's spec; each phase's schedule is solved for a nominal image (``NOMINAL_IMAGE``
  pixels through the checkpoint's own image processor) for the log and a first check, and,
  where the image processor gives sizes in tokens (the Qwen family), for every image of the
  data before training;
* the output: the LoRA adapter (with the projector, ``modules_to_save``) or the full model,
  the base's ``config.json``, its processor files, ``adsc_pruning.json`` (the target spec,
  what inference entry points default to) and ``adsc_training.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import replace

from PIL import Image

from adsc_patch import PruningSpec, ScheduleError, apply_adsc, compat, remove_adsc, solve_drop_ratio, vision_schedule
from adsc_patch.adapters import adapter_for
from adsc_patch.methods import get_method
from adsc_patch.patch import hf_plan

from ..cli import InputError
from ..model.hub import resolve_pretrained
from ..model.vlm import checkpoint_model_type, load_processor, read_recorded_spec, write_recorded_spec
from .curriculum import CurriculumCallback, CurriculumPhase, plan_curriculum
from .data import DataError
from .trainer import LLaVATrainer, _unquantised, final_output, write_training_summary
from .vlm_data import VlmDataCollator, VlmDataset, image_token_count

logger = logging.getLogger("llava.train")

__all__ = ["NOMINAL_IMAGE", "PROCESSOR_FILES", "VlmPlan", "lora_target_pattern", "projector_module_names",
           "plan_vlm_fine_tune", "run_vlm_training", "copy_processor_files", "save_vlm_output"]

NOMINAL_IMAGE = (448, 448)  # width, height: the image each phase's schedule is logged and first checked for
# What a checkpoint folder holds for its processor (tokenizer, image/video processor, chat template).
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "chat_template.jinja")
_DECODER_LINEARS = r"\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


# ---------------------------------------------------------------------- what is trained
def _module_name(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise InputError(f"{type(model).__name__}: the language model is not one of its modules")


def lora_target_pattern(model) -> str:
    """peft's ``target_modules`` pattern (matched against whole module names): the attention and
    MLP projections of the text decoder's layers, rooted at the language model's own name
    (``model.language_model``), so no vision-tower linear (``model.visual.blocks.*.mlp.*``)
    can match."""
    return re.escape(_module_name(model, adapter_for(model).language_model(model))) + _DECODER_LINEARS


def projector_module_names(model) -> list[str]:
    """The full names of the modules between the vision tower and the language model (the
    adapter's ``projectors``: Qwen's ``merger`` and Qwen3-VL's DeepStack mergers,
    LLaVA-NeXT/OneVision's ``multi_modal_projector``)."""
    return [_module_name(model, module) for module in adapter_for(model).projectors(model)]


def _vision_module_names(model) -> list[str]:
    """The vision tower's full name (never quantised, always frozen)."""
    return [_module_name(model, adapter_for(model).vision_tower(model))]


def _set_trainable(model, adsc, model_args, training_args) -> tuple[object, str]:
    """Freeze per the mode; returns (model to hand to the Trainer, output mode)."""
    model.requires_grad_(False)
    projectors = projector_module_names(model)
    if adsc.finetune_mode == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if training_args.bits in (4, 8):
            with compat.peft_without_alias_warnings():
                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=training_args.activation_checkpointing,
                    gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs,
                )
            model.requires_grad_(False)
        lora = LoraConfig(
            r=training_args.lora_r, lora_alpha=training_args.lora_alpha, lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias, target_modules=lora_target_pattern(model),
            modules_to_save=None if training_args.freeze_mm_mlp_adapter else projectors, task_type="CAUSAL_LM",
        )
        with compat.peft_without_alias_warnings():
            peft_model = get_peft_model(model, lora)
        peft_model.print_trainable_parameters()
        return peft_model, "lora"
    adapter_for(model).language_model(model).requires_grad_(not model_args.freeze_backbone)
    model.get_output_embeddings().requires_grad_(not model_args.freeze_backbone)
    for name in _vision_module_names(model):
        model.get_submodule(name).requires_grad_(False)
    for name in projectors:  # a projector inside the tower (Qwen's merger) follows its own flag
        model.get_submodule(name).requires_grad_(not training_args.freeze_mm_mlp_adapter)
    return model, "full"


# ---------------------------------------------------------------------- the plan (no weights needed)
class VlmPlan:
    """The fine-tune's target and curriculum, from the checkpoint's config and processor alone.

    ``target``: the spec recorded at the end; ``fraction``: the target as a fraction of an
    image's tokens (with ``--drop_ratio``, the nominal image's average over its count);
    ``nominal_tokens``: the nominal image's vision tokens; ``phase_spec(phase)``: what
    ``apply_adsc`` is given in a phase (the target itself at factor 1, else the budget
    fraction ``factor x fraction``)."""

    def __init__(self, target: PruningSpec | None, layers: tuple[int, ...], num_layers: int, nominal_tokens: int,
                 factors: tuple[float, ...], fractions: tuple[float, ...]):
        self.target, self.layers, self.num_layers = target, layers, num_layers
        self.nominal_tokens, self.factors, self.fractions = nominal_tokens, factors, fractions
        if target is None:
            self.fraction = None
        elif target.budget_fraction is not None:
            self.fraction = target.budget_fraction
        else:
            self.fraction = vision_schedule(num_layers, nominal_tokens, layers, target.drop_ratio).average_tokens \
                / nominal_tokens

    def spec_for(self, factor: float) -> PruningSpec:
        if factor == 1.0:
            return self.target
        try:
            return replace(self.target, budget_fraction=factor * self.fraction, drop_ratio=None, budget=None)
        except ScheduleError as error:
            raise ScheduleError(f"the curriculum's phase at {factor:g} x the target: {error}") from None

    def phase_spec(self, phase: CurriculumPhase) -> PruningSpec:
        return self.spec_for(phase.factor)

    def phase_fraction(self, phase: CurriculumPhase) -> float:
        return phase.factor * self.fraction

    def solve_nominal(self, budget: float):
        try:
            return solve_drop_ratio(self.num_layers, self.nominal_tokens, self.layers, budget)
        except ScheduleError as error:
            raise ScheduleError(f"the nominal {NOMINAL_IMAGE[0]}x{NOMINAL_IMAGE[1]} image "
                                f"({self.nominal_tokens} vision tokens): {error}") from None

    def plan(self, total_steps: int) -> list[CurriculumPhase]:
        """The phases over ``total_steps``, each solved for the nominal image; with ``--drop_ratio``
        the last phase is the ratio's own schedule."""
        phases = plan_curriculum(self.fraction * self.nominal_tokens, self.factors, self.fractions, total_steps,
                                 self.solve_nominal)
        for phase in phases:
            spec = self.phase_spec(phase)
            if spec.drop_ratio is not None:
                phases[phase.index] = replace(phase, schedule=vision_schedule(
                    self.num_layers, self.nominal_tokens, self.layers, spec.drop_ratio))
        return phases

    def schedule_for(self, spec: PruningSpec, num_tokens: int):
        """One image's schedule under ``spec`` (``ScheduleError`` when it cannot be met)."""
        if spec.drop_ratio is not None:
            return vision_schedule(self.num_layers, num_tokens, self.layers, spec.drop_ratio)
        return solve_drop_ratio(self.num_layers, num_tokens, self.layers, spec.budget_fraction * num_tokens)

    def describe(self, phase: CurriculumPhase, count: int) -> str:
        schedule = phase.schedule
        return (f"curriculum phase {phase.index + 1}/{count} from step {phase.start_step}: budget fraction "
                f"{phase.factor:g} x target = {self.phase_fraction(phase):.4f} of each image's vision tokens "
                f"(nominal {NOMINAL_IMAGE[0]}x{NOMINAL_IMAGE[1]} image of {self.nominal_tokens} tokens: drop ratio "
                f"{schedule.drop_ratio:.4f}, {' -> '.join(map(str, schedule.stage_tokens))}, average "
                f"{schedule.average_tokens:.2f})")


def _nominal_tokens(processor, config) -> int:
    """Vision tokens of the nominal image: from the image processor's size rule where it has one
    (the Qwen family), else the image tokens the processor expands for it in a prompt."""
    width, height = NOMINAL_IMAGE
    count = image_token_count(processor, width, height)
    if count is not None:
        return count
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(config, "image_token_index", None)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], images=[Image.new("RGB", NOMINAL_IMAGE)], add_special_tokens=False)["input_ids"][0]
    return int(sum(1 for token in ids if token == image_token))


def plan_vlm_fine_tune(path: str, processor, adsc) -> VlmPlan:
    """The target, prune layers and curriculum of the fine-tune of the checkpoint at ``path``,
    every phase solved for the nominal image: errors before any weight is loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    num_layers = int(config.get_text_config().num_hidden_layers)
    rule = get_method(adsc.prune_method)
    if not rule.in_decoder:
        raise InputError(f"--prune_method {adsc.prune_method} reduces the image before the language model, which "
                         f"the {config.model_type} patch does not run: use an in-decoder method (adsc, fastv, pdrop)")
    factors, fractions = adsc.factors(), adsc.fractions()
    nominal = _nominal_tokens(processor, config)
    if not factors:
        return VlmPlan(None, (), num_layers, nominal, (), ())
    target = adsc.spec()
    recorded = read_recorded_spec(path)
    if target is None:
        if recorded is None or not recorded.enabled or recorded.budget is not None:
            raise InputError("give --budget_fraction (e.g. 0.333) or --drop_ratio: the target of the ADSC fine-tune "
                             "(or --curriculum none to train on all vision tokens)")
        target = replace(recorded, method=adsc.prune_method, selection=adsc.prune_selection)
        if adsc.layers() is not None:
            target = replace(target, layers=tuple(adsc.layers()))
        logger.info("target: the checkpoint's recorded spec %s", target)
    layers = target.layers
    if layers is None:
        saved = recorded.layers if recorded is not None and recorded.method == target.method else None
        layers = tuple(saved) if saved and rule.fits_layers(saved) else tuple(rule.default_layers(num_layers))
    target = replace(target, layers=tuple(layers))
    try:
        vision_schedule(num_layers, 1, layers, 0.0)  # layers in range
        plan = VlmPlan(target, tuple(layers), num_layers, nominal, factors, fractions)
        phases = plan.plan(len(factors))
        for phase in phases:
            plan.phase_spec(phase)
    except ScheduleError as error:
        raise ScheduleError(f"the curriculum's budgets are infeasible for this model: {error}") from error
    logger.info("%s curriculum, prune method %s, over prune layers %s: budget fractions %s (a nominal %dx%d image "
                "of %d tokens: averages %s)", adsc.curriculum, adsc.prune_method, list(layers),
                ", ".join(f"{plan.phase_fraction(p):.4f}" for p in phases), *NOMINAL_IMAGE, nominal,
                ", ".join(f"{p.schedule.average_tokens:.2f}" for p in phases))
    return plan


def _check_images_fit(plan: VlmPlan, dataset: VlmDataset) -> None:
    """Every phase's schedule met by every image of the data (token counts from the image
    processor; nothing to check where it gives none): ``ScheduleError`` naming a sample."""
    first_with = {}
    for sample, counts in zip(dataset.samples, dataset.image_tokens):
        for count in counts:
            first_with.setdefault(count, sample.name)
    specs = {plan.spec_for(factor) for factor in plan.factors}
    for count in sorted(first_with):
        for spec in specs:
            try:
                plan.schedule_for(spec, count)
            except ScheduleError as error:
                raise ScheduleError(f"the curriculum's budgets are infeasible for an image of {count} vision tokens "
                                    f"({first_with[count]}, the smallest such): {error}") from None


# ---------------------------------------------------------------------- output
def copy_processor_files(source: str, destination: str) -> list[str]:
    """Copy the processor's files (``PROCESSOR_FILES``) that ``source`` has; returns their names."""
    copied = []
    for name in PROCESSOR_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(destination, name))
            copied.append(name)
    return copied


def save_vlm_output(trainer, model, mode: str, processor_source: str, spec: PruningSpec, base_name: str) -> None:
    """Write the final model to ``args.output_dir`` so that ``load_transformers_vlm`` reads it:
    ``lora``: the adapter (``adapter_config.json`` recording ``base_name``,
    ``adapter_model.safetensors`` with the projector's ``modules_to_save``) and the base's
    config; ``full``: the complete model. Both with the processor files of
    ``processor_source`` and ``adsc_pruning.json`` (``spec``). Files move in by atomic renames."""
    with final_output(trainer) as (scratch, state):
        if scratch is None:
            return
        config = _unquantised(model.config)
        if mode == "lora":
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(scratch, state_dict=state)
            adapter_file = os.path.join(scratch, "adapter_config.json")
            with open(adapter_file) as f:
                adapter_config = json.load(f)
            adapter_config["base_model_name_or_path"] = base_name
            with open(adapter_file, "w") as f:
                json.dump(adapter_config, f, indent=2)
            config.save_pretrained(scratch)
        else:
            model.save_pretrained(scratch, state_dict=state)
            if config is not model.config:
                config.save_pretrained(scratch)
        copy_processor_files(processor_source, scratch)
        write_recorded_spec(scratch, spec)
    logger.info("saved the %s output to %s", mode, trainer.args.output_dir)


def _set_use_cache(config, value: bool) -> None:
    config.use_cache = value
    text = config.get_text_config()
    if text is not config:
        text.use_cache = value


# ---------------------------------------------------------------------- the run
def run_vlm_training(model_args, data_args, training_args, adsc, attn_implementation: str, load_kwargs: dict,
                     callbacks: list):
    """Fine-tune a checkpoint of ``TRANSFORMERS_VLM_TYPES`` (see the module docstring); returns
    ``train.TrainingResult``. ``load_kwargs``: ``from_pretrained``'s dtype, attention and
    quantisation (``train._load_kwargs``); ``callbacks``: the Trainer's others (timed saves)."""
    import pathlib

    from transformers import AutoModelForImageTextToText

    from .train import TrainingResult

    path = resolve_pretrained(model_args.model_name_or_path, "--model_name_or_path")
    model_type = checkpoint_model_type(path)
    for flag, value in (("--tune_mm_mlp_adapter True", model_args.tune_mm_mlp_adapter),
                        ("--vision_tower", model_args.vision_tower),
                        ("--pretrain_mm_mlp_adapter", model_args.pretrain_mm_mlp_adapter)):
        if value:
            raise InputError(f"{flag} is for LLaVA-1.5 checkpoints; {model_args.model_name_or_path} is a "
                             f"{model_type} checkpoint with its own vision tower and projector")
    processor = load_processor(path)
    if getattr(processor, "chat_template", None) is None:
        raise InputError(f"{path}: the processor has no chat template, which builds the training prompts")
    plan = plan_vlm_fine_tune(path, processor, adsc)

    dataset = VlmDataset(data_args.data_path, processor, data_args.image_folder,
                         max_length=training_args.model_max_length,
                         skip_missing_images=data_args.skip_missing_images,
                         skip_bad_samples=data_args.skip_bad_samples)
    if plan.target is not None:
        _check_images_fit(plan, dataset)

    model = AutoModelForImageTextToText.from_pretrained(path, **load_kwargs)
    logger.info("%s (%s), attention: %s%s", path, type(model).__name__, model.config._attn_implementation,
                f", language model in {training_args.bits} bit" if training_args.bits in (4, 8) else "")
    _set_use_cache(model.config, False)
    for spec in {plan.spec_for(factor) for factor in plan.factors}:
        hf_plan(model, spec)  # the patch accepts every phase's spec on this model

    trained, mode = _set_trainable(model, adsc, model_args, training_args)
    curriculum = None
    if plan.target is not None:
        curriculum = CurriculumCallback(model, plan.plan, apply=lambda phase: apply_adsc(model, plan.phase_spec(phase)),
                                        describe=plan.describe)
    else:
        remove_adsc(model)
        logger.info("no curriculum: training on all vision tokens")

    def pruning_log() -> dict:
        if curriculum is None or curriculum.current is None:
            return {}
        return {"budget_fraction": round(plan.phase_fraction(curriculum.current), 6)}

    trainer = LLaVATrainer(
        model=trained, args=training_args, train_dataset=dataset,
        data_collator=VlmDataCollator(_pad_id(processor.tokenizer)),
        callbacks=[c for c in (curriculum, *callbacks) if c is not None] or None,
        projector_names=tuple(f"{name}." for name in projector_module_names(model)),
        pruning_log=pruning_log,
    )
    resume = training_args.resume_from_checkpoint
    if resume is None and list(pathlib.Path(training_args.output_dir).glob("checkpoint-*")):
        resume = True
    trainer.train(resume_from_checkpoint=resume)

    final = plan.target if plan.target is not None else replace(PruningSpec.off(), method=adsc.prune_method)
    if plan.target is not None:
        apply_adsc(model, plan.target)
    _set_use_cache(model.config, True)
    base_name = os.path.abspath(path) if os.path.isdir(model_args.model_name_or_path) else model_args.model_name_or_path
    save_vlm_output(trainer, model, mode, path, final, base_name)
    nominal = plan.schedule_for(plan.target, plan.nominal_tokens) if plan.target is not None else None
    write_training_summary(
        trainer, mode, len(dataset.skipped), model_type=model_type, target=final.to_dict(),
        target_budget_fraction=plan.fraction,
        nominal_image={"size": list(NOMINAL_IMAGE), "vision_tokens": plan.nominal_tokens},
        final_schedule=nominal.describe() if nominal is not None else "all vision tokens",
        curriculum=[plan.describe(p, len(curriculum.phases)) for p in curriculum.phases] if curriculum else [])
    return TrainingResult(training_args.output_dir, model, trainer, dataset)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has neither a pad nor an end-of-sequence token to pad batches with")
    return tokenizer.eos_token_id


def refuse_absolute_budget(model_name_or_path: str, adsc) -> None:
    """One line before any weight loads: an absolute ``--vision_token_budget`` means nothing on
    a model whose images differ in size."""
    if adsc.vision_token_budget is not None:
        model_type = checkpoint_model_type(model_name_or_path)
        raise InputError(f"--vision_token_budget {adsc.vision_token_budget:g} is an absolute count of vision tokens, "
                         f"but {model_name_or_path} is a {model_type} model whose images differ in size: give "
                         "--budget_fraction (e.g. 0.333) or --drop_ratio")

