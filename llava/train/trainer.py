"""``LLaVATrainer``: the projector's own learning rate, modality-grouped batches, budget logging,
checkpoints every so many minutes, and the atomic writing of the training output in
upstream's layout."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices

from llava.model.builder import write_tower_relative

logger = logging.getLogger(__name__)

__all__ = ["LLaVATrainer", "ModalityLengthGroupedSampler", "SaveEveryMinutesCallback", "save_training_output",
           "final_output", "write_training_summary"]


def _modality_grouped_indices(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """Full batches never mix image and text-only samples; within a modality, similar
    lengths share a batch; batch order is shuffled. The two modalities' leftovers (fewer
    than a batch each) form the last batch."""
    image = [i for i, n in enumerate(lengths) if n > 0]
    text = [i for i, n in enumerate(lengths) if n <= 0]
    batches, leftover = [], []
    for group in (image, text):
        if not group:
            continue
        order = get_length_grouped_indices([abs(lengths[i]) for i in group], batch_size, generator=generator)
        ordered = [group[i] for i in order]
        full = len(ordered) - len(ordered) % batch_size
        batches += [ordered[i : i + batch_size] for i in range(0, full, batch_size)]
        leftover += ordered[full:]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [index for b in shuffled for index in batches[b]] + leftover


class ModalityLengthGroupedSampler(Sampler):
    """Upstream's ``--group_by_modality_length``: grouping keys are positive for samples
    with an image and negative for text-only ones."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(_modality_grouped_indices(self.lengths, self.batch_size, generator))


class LLaVATrainer(Trainer):
    """The Trainer of both fine-tune paths. ``projector_names``: name parts of the projector's
    parameters (``--mm_projector_lr``; default LLaVA's ``mm_projector``); ``pruning_log``: the
    pruning fields every logged loss carries (default: the LLaVA config's budget and ratio)."""

    def __init__(self, *args, projector_names: tuple[str, ...] = ("mm_projector",),
                 pruning_log: Callable[[], dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_names = tuple(projector_names)
        self.pruning_log = pruning_log

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(self.args, "group_by_modality_length", False) and hasattr(dataset, "modality_lengths"):
            batch = self.args.train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            return ModalityLengthGroupedSampler(dataset.modality_lengths, batch, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        """Adam groups as the Trainer's, with projector parameters at ``--mm_projector_lr``."""
        projector_lr = getattr(self.args, "mm_projector_lr", None)
        if projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            key = (any(part in name for part in self.projector_names), name in decay)
            groups.setdefault(key, []).append(param)
        param_groups = []
        for (is_projector, has_decay), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if has_decay else 0.0}
            if is_projector:
                group["lr"] = projector_lr
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict, start_time=None) -> None:
        config = getattr(self.model, "config", None)
        if self.pruning_log is not None:
            if "loss" in logs:
                logs.update(self.pruning_log())
        elif config is not None and getattr(config, "prune_layers", None) and "loss" in logs:
            budget = getattr(config, "vision_token_budget", None)
            if budget is not None:
                logs["vision_token_budget"] = round(float(budget), 4)
            logs["drop_ratio"] = round(float(config.drop_ratio), 6)
        super().log(logs, start_time)


class SaveEveryMinutesCallback(TrainerCallback):
    """Asks for a checkpoint at the end of the first optimizer step that finds ``minutes``
    passed since the last save (any save, step-based ones included) or the start.

    ``clock`` returns seconds (``time.monotonic``). Under several processes the ranks agree
    (an all-reduce of one flag per step): a save is collective under DeepSpeed.
    """

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = minutes * 60
        self.clock = clock
        self.last_save = clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        due = _on_any_rank(self.clock() - self.last_save >= self.seconds, args.device)
        if due and not control.should_save:
            logger.info("step %d: %.1f minutes since the last checkpoint: saving one", state.global_step,
                        (self.clock() - self.last_save) / 60)
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = self.clock()


def _on_any_rank(flag: bool, device) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    if torch.distributed.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _state_dict(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trained weights on the CPU, gathered from DeepSpeed ZeRO-3 shards if needed."""
    if trainer.is_deepspeed_enabled:
        state = trainer.accelerator.get_state_dict(trainer.deepspeed)
    else:
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    return {k: v.detach().cpu() for k, v in state.items()}


def _move_into(source_dir: str, output_dir: str) -> None:
    """Move every file of ``source_dir`` into ``output_dir``, each with an atomic rename."""
    for name in os.listdir(source_dir):
        os.replace(os.path.join(source_dir, name), os.path.join(output_dir, name))


def save_training_output(trainer: Trainer, llava_model, tokenizer, mode: str) -> None:
    """Write the final model to ``args.output_dir`` so that ``load_pretrained_model`` reads it.

    * ``lora``: ``adapter_config.json`` + ``adapter_model.safetensors``, the projector in
      ``non_lora_trainables.bin`` (keys ``base_model.model.model.mm_projector.*``), the
      config (with the ADSC fields) and the tokenizer; load with ``model_base``.
    * ``full``: a complete checkpoint.
    * ``projector``: ``mm_projector.bin`` and the config; load with ``model_base``.

    Files are written to a scratch folder beside the output and moved in one by one with
    ``os.replace``, so a crash never leaves a half-written file under its final name.
    """
    args = trainer.args
    with final_output(trainer) as (scratch, state):
        if scratch is None:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        if mode == "lora":
            model.save_pretrained(scratch, state_dict=state)  # PEFT keeps the adapter's part
            projector = {
                f"base_model.model.{_plain_name(k)}": v
                for k, v in state.items()
                if "mm_projector" in k and "original_module" not in k
            }
            torch.save(projector, os.path.join(scratch, "non_lora_trainables.bin"))
            _unquantised(llava_model.config).save_pretrained(scratch)
        elif mode == "projector":
            projector = {_plain_name(k): v for k, v in state.items() if "mm_projector" in k}
            torch.save(projector, os.path.join(scratch, "mm_projector.bin"))
            _unquantised(llava_model.config).save_pretrained(scratch)
        else:
            llava_model.save_pretrained(scratch, state_dict=state)
        tokenizer.save_pretrained(scratch)
        write_tower_relative(scratch, args.output_dir)
    logger.info("saved the %s output to %s", mode, args.output_dir)


@contextmanager
def final_output(trainer):
    """``(scratch folder, state dict)`` to write a run's final output into: a folder beside
    ``args.output_dir`` whose files move in, each by an atomic rename, when the block ends
    without error (so a crash never leaves a half-written file under its final name). The
    state dict is gathered on every process (ZeRO-3 gathers collectively); the folder is
    ``None`` on the processes that do not save."""
    args = trainer.args
    state = _state_dict(trainer)
    if not args.should_save:
        yield None, state
        return
    os.makedirs(args.output_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".partial-", dir=args.output_dir)
    try:
        yield scratch, state
        _move_into(scratch, args.output_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _unquantised(config):
    """The config without the bitsandbytes settings of a QLoRA run: the adapter is loaded
    (and merged) on the base in full precision."""
    if getattr(config, "quantization_config", None) is None:
        return config
    config = copy.deepcopy(config)
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, name):
            delattr(config, name)
    return config


def _plain_name(key: str) -> str:
    """``base_model.model.model.mm_projector.modules_to_save.default.0.weight`` ->
    ``model.mm_projector.0.weight``."""
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    return key.replace(".modules_to_save.default", "")



def write_training_summary(trainer, mode: str, skipped_samples: int, **fields) -> None:
    """``adsc_training.json`` in the output folder (atomically; the main process only): the
    mode, what the recipe resolved (``fields``), steps, seed, attention, bits, skipped samples
    and every logged training loss."""
    args = trainer.args
    if not args.should_save:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    summary = {
        "mode": mode,
        **fields,
        "steps": trainer.state.global_step,
        "seed": args.seed,
        "attn_implementation": model.config._attn_implementation,
        "bits": args.bits,
        "skipped_samples": skipped_samples,
        "train_loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    path = os.path.join(args.output_dir, "adsc_training.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
