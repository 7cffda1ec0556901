"""Command-line arguments of ``llava.train.train``: upstream LLaVA's flag names plus ADSC's.

Parsed with ``transformers.HfArgumentParser`` into four dataclasses; nothing is kept in
module-level state. A bad value raises ``llava.cli.InputError`` (a ``ValueError``) naming
the flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers

from adsc_patch import compat
from adsc_patch import PruningSpec, ScheduleError
from adsc_patch.methods import PRUNE_METHODS

from ..cli import InputError

CURRICULA = ("reverse", "standard", "direct", "none")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
DEFAULT_FACTORS = {"reverse": (0.8, 0.9, 1.0), "standard": (1.2, 1.1, 1.0), "direct": (1.0,), "none": ()}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "LLaVA checkpoint to fine-tune (or a plain Llama with --vision_tower)"})
    version: str = field(default="v1", metadata={"help": "conversation template: v1/vicuna_v1, llava_v1, plain"})
    freeze_backbone: bool = field(default=False)
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "train the projector only (pre-training)"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP tower; default: the checkpoint's"})
    mm_vision_select_layer: int = field(default=-2)
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "mm_projector.bin to start from"})
    mm_projector_type: str = field(default="mlp2x_gelu")
    mm_use_im_start_end: bool = field(default=False)
    mm_use_im_patch_token: bool = field(default=False)
    mm_patch_merge_type: str = field(default="flat")
    mm_vision_select_feature: str = field(default="patch")
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "attention of the language model: eager, sdpa (default) or flash_attention_2 "
                          "(needs flash-attn and a CUDA GPU; train_mem.py's default when both are there)"},
    )


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA JSON (list of samples) or JSON lines"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "kept for upstream scripts; always lazy"})
    is_multimodal: bool = field(default=True)
    image_folder: str | None = field(default=None)
    image_aspect_ratio: str = field(default="pad")
    skip_missing_images: bool = field(
        default=False, metadata={"help": "drop samples whose image file is missing (counted) instead of failing"}
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "drop samples with a missing or undecodable image, or that --model_max_length would cut "
                          "badly (every reply cut off, an image cut in two), instead of failing; logged with examples"},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False)
    mpt_attn_impl: str | None = field(default="triton", metadata={"help": "unused (upstream MPT flag)"})
    model_max_length: int = field(default=2048, metadata={"help": "longest spliced sequence (text + image tokens)"})
    double_quant: bool = field(default=True, metadata={"help": "--bits 4: quantise the quantisation constants too"})
    quant_type: str = field(default="nf4", metadata={"help": "--bits 4: nf4 or fp4"})
    bits: int = field(default=16, metadata={"help": "4 or 8: QLoRA on a bitsandbytes-quantised language model"})
    save_every_minutes: float = field(
        default=30,
        metadata={"help": "also save a checkpoint when this many minutes have passed since the last (0: off)"},
    )
    lora_enable: bool = field(default=False)
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_weight_path: str = field(default="")
    lora_bias: str = field(default="none")
    mm_projector_lr: float | None = field(default=None)
    group_by_modality_length: bool = field(default=False)
    # upstream scripts were written for transformers 4.x
    warmup_ratio: float | None = field(default=None, metadata={"help": "alias of warmup_steps < 1 (a ratio)"})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "alias of eval_strategy"})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise InputError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.save_every_minutes < 0:
            raise InputError(f"--save_every_minutes must be >= 0 (0: off), got {self.save_every_minutes}")
        if self.bits not in (4, 8, 16, 32):
            raise InputError(f"--bits must be 4 or 8 (QLoRA), or 16/32 (no quantisation), got {self.bits}")
        compat.adopt_renamed_training_args(self)
        super().__post_init__()


@dataclass
class AdscArguments:
    prune_layers: str | None = field(
        default=None, metadata={"help": "comma-separated 0-based decoder layers (default: 2,6,12,20 scaled to depth)"}
    )
    drop_ratio: float | None = field(default=None, metadata={"help": "target drop ratio (or --vision_token_budget)"})
    vision_token_budget: float | None = field(
        default=None, metadata={"help": "target average vision tokens over all layers (e.g. 192 of 576)"}
    )
    budget_fraction: float | None = field(
        default=None,
        metadata={"help": "target as a fraction of each image's own vision tokens (e.g. 0.333): the unit for "
                          "models whose images differ in size (Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision)"},
    )
    prune_selection: str = field(default="uniform_2d", metadata={"help": "uniform_2d, uniform_1d or random"})
    prune_method: str = field(
        default="adsc",
        metadata={"help": "adsc, fastv, pdrop (in the decoder) or tome, visionzip, pool (before it), or a registered "
                          "method (adsc_patch.register_method); docs/methods.md"},
    )
    curriculum: str = field(
        default="reverse",
        metadata={"help": "reverse (0.8,0.9,1.0), standard (1.2,1.1,1.0), direct, or none (train on all tokens)"},
    )
    curriculum_factors: str | None = field(default=None, metadata={"help": "budget multipliers per phase, e.g. 0.8,0.9,1.0"})
    curriculum_phase_fractions: str | None = field(
        default=None, metadata={"help": "share of the steps per phase (default: equal)"}
    )
    finetune_mode: str = field(default="lora", metadata={"help": "lora (LoRA on the LM + projector) or full"})

    def layers(self) -> list[int] | None:
        if self.prune_layers is None or self.prune_layers.strip() == "":
            return None
        try:
            return [int(x) for x in self.prune_layers.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--prune_layers takes comma-separated integers, got {self.prune_layers!r}") from None

    def factors(self) -> tuple[float, ...]:
        if self.curriculum not in CURRICULA:
            raise InputError(f"--curriculum must be one of {CURRICULA}, got {self.curriculum!r}")
        if self.curriculum_factors:
            return _floats(self.curriculum_factors, "--curriculum_factors")
        return DEFAULT_FACTORS[self.curriculum]

    def fractions(self) -> tuple[float, ...]:
        count = len(self.factors())
        if count == 0:
            return ()
        if not self.curriculum_phase_fractions:
            return tuple([1.0 / count] * count)
        fractions = _floats(self.curriculum_phase_fractions, "--curriculum_phase_fractions")
        if len(fractions) != count or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise InputError(
                f"--curriculum_phase_fractions needs {count} positive shares summing to 1, got {fractions}"
            )
        return fractions

    def validate(self) -> None:
        if self.finetune_mode not in ("lora", "full"):
            raise InputError(f"--finetune_mode must be lora or full, got {self.finetune_mode!r}")
        units = [flag for flag, value in (("--drop_ratio", self.drop_ratio),
                                          ("--vision_token_budget", self.vision_token_budget),
                                          ("--budget_fraction", self.budget_fraction)) if value is not None]
        if len(units) > 1:
            raise InputError("give one of --drop_ratio, --vision_token_budget, --budget_fraction, not "
                             + " and ".join(units))
        if self.curriculum == "none" and (self.drop_ratio or self.vision_token_budget or self.budget_fraction
                                          or self.curriculum_factors):
            raise InputError("--curriculum none trains on all vision tokens: drop the pruning target flags")
        if self.prune_method not in PRUNE_METHODS:
            raise InputError(f"--prune_method {self.prune_method!r}: known {', '.join(PRUNE_METHODS)}")
        self.layers()
        self.fractions()
        self.spec()

    def spec(self) -> PruningSpec | None:
        """The fine-tune's target as an ``adsc_patch.PruningSpec`` (``None`` without
        ``--drop_ratio`` / ``--vision_token_budget`` / ``--budget_fraction``): the one place its
        method, layers, selection and unit are checked together; ``InputError`` naming the
        flags otherwise."""
        if self.drop_ratio is None and self.vision_token_budget is None and self.budget_fraction is None:
            return None
        layers = self.layers()
        try:
            return PruningSpec(self.prune_method, budget=self.vision_token_budget, drop_ratio=self.drop_ratio,
                               budget_fraction=self.budget_fraction,
                               layers=None if layers is None else tuple(layers), selection=self.prune_selection)
        except ScheduleError as error:
            raise InputError(f"--prune_method/--prune_layers/--prune_selection and the target: {error}") from None


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{flag} takes comma-separated numbers, got {text!r}") from None
