"""``VlmChatEngine``: the chat engine of the demo and the terminal chat for transformers' own VLMs
(Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision; ``llava.model.vlm``).

The same turns, streaming and metrics as ``ChatEngine`` (LLaVA-1.5); what differs: prompts
come from the model's own chat template and processor, a setting is a ``PruningSpec`` used for
one call (``adsc_patch.pruning``), and since these models' images differ in size the budget is
a fraction of each image's own vision tokens (``PruningSpec.budget_fraction``), the slider's
unit. Vision tokens per layer are read off the call's trace; FLOPs come from the one cost
model (``adsc_patch.profile``) on the model's config and the image's token count.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from adsc_patch import IN_LLM_METHODS, PruningSpec, PruningTrace, ScheduleError
from adsc_patch.methods import get_method
from adsc_patch.patch import hf_plan
from adsc_patch.profile import ModelShape, Workload, grid_schedule_cost, image_tokens
from adsc_patch.schedule import lowest_reachable_average

from ..cli import InputError
from ..mm_utils import fit_new_tokens
from ..model.vlm import LoadedVlm, chat_messages, encode_prompts, mean_vision_tokens_per_row
from .chat import MAX_IMAGE_PIXELS, ChatEngine

__all__ = ["VlmChatEngine", "spec_label"]

# The image size the slider's lowest reachable fraction is worked out for (tokens); a smaller
# image may need a higher fraction, which its call then refuses in one line.
NOMINAL_IMAGE_TOKENS = 1024


def spec_label(spec: PruningSpec) -> str:
    """``full``, ``adsc @ 33% · layers 1, 2``: what a pane ran."""
    if not spec.enabled:
        return "full"
    if spec.budget_fraction is not None:
        label = f"{spec.method} @ {100 * spec.budget_fraction:.3g}%"
    elif spec.budget is not None:
        label = f"{spec.method} @ {spec.budget:g}"
    else:
        label = f"{spec.method} ratio {spec.drop_ratio:.3g}"
    if spec.layers:
        label += f" · layer{'s' if len(spec.layers) > 1 else ''} {', '.join(map(str, spec.layers))}"
    return label


class VlmChatEngine(ChatEngine):
    """One transformers VLM in memory answering chat turns under any in-decoder pruning spec."""

    budget_label = "budget: fraction of each image's vision tokens"
    budget_step = 0.01
    methods = IN_LLM_METHODS

    def __init__(self, loaded: LoadedVlm, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.loaded = loaded
        self.model, self.tokenizer, self.image_processor = loaded.model, loaded.tokenizer, None
        self.conv_mode = None
        self.max_image_pixels = max_image_pixels
        self.num_layers = loaded.num_layers
        self.context_length = loaded.context_length
        self.num_patches = None  # per image
        self.shape = ModelShape.from_config(loaded.model.config,
                                            preprocessor=loaded.processor.image_processor.to_dict())

    # ------------------------------------------------------------------ settings
    def setting(self, method: str | None, budget: float | None, prune_layers=None) -> PruningSpec:
        """``method`` at ``budget`` (a fraction of each image's vision tokens; ``None`` /
        ``"full"``: no pruning) at ``prune_layers`` (default: the checkpoint's recorded ones for
        its method, else the method's own); ``ScheduleError`` for what cannot run here."""
        if method in (None, "full"):
            return PruningSpec.off()
        if budget is None or not 0 < float(budget) <= 1:
            raise ScheduleError(f"budget {budget}: this model's images differ in size, so the budget is a fraction "
                                "of each image's vision tokens, in (0, 1]")
        layers = None if prune_layers is None else tuple(prune_layers)
        if layers is None:
            layers = self.prune_layers_for(method)
        spec = PruningSpec(method=method, budget_fraction=float(budget), layers=layers)
        hf_plan(self.model, spec)  # refuses what this model cannot run, before any call
        return spec

    def default_setting(self) -> PruningSpec:
        """The checkpoint's recorded spec (our fine-tune's), else ADSC at a third of each image's tokens."""
        recorded = self.loaded.recorded
        if recorded is not None and recorded.enabled:
            return recorded
        return self.setting("adsc", self.default_budget())

    def default_choice(self) -> tuple[str, float | None]:
        default = self.default_setting()
        return default.method, default.budget_fraction

    def default_budget(self) -> float:
        recorded = self.loaded.recorded
        if recorded is not None and recorded.budget_fraction is not None:
            return recorded.budget_fraction
        return 0.33

    def prune_layers_for(self, method: str) -> tuple[int, ...]:
        recorded = self.loaded.recorded
        rule = get_method(method)
        if recorded is not None and recorded.layers and recorded.method == method:
            return tuple(recorded.layers)
        if recorded is not None and recorded.layers and rule.fits_layers(recorded.layers):
            return tuple(recorded.layers)
        return tuple(rule.default_layers(self.num_layers))

    def reachable_budgets(self, method: str, prune_layers=None) -> tuple[float, float]:
        """Fractions ``method`` reaches at ``prune_layers`` for an image of ``NOMINAL_IMAGE_TOKENS``."""
        layers = self.prune_layers_for(method) if prune_layers is None else tuple(prune_layers)
        get_method(method).check_layers(layers)
        if not layers:
            return 1.0, 1.0
        lowest = lowest_reachable_average(self.num_layers, NOMINAL_IMAGE_TOKENS, layers) / NOMINAL_IMAGE_TOKENS
        return min(1.0, math.ceil(100 * lowest + 1) / 100), 1.0

    def picture(self, image: Image.Image, trace: PruningTrace | None) -> Image.Image:
        from .picture import kept_patches_picture

        grid = trace.images[0][0][1] if trace is not None and trace.images and trace.images[0] else None
        return kept_patches_picture(image, trace, None, self.num_layers, grid=grid)

    # ------------------------------------------------------------------ prompts
    def prompt(self, history, question: str) -> str:
        """The model's own chat template over the turns (the image with the first user turn)."""
        messages = chat_messages([*history, (question, None)])
        return self.loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, image: Image.Image, history, question: str, max_new_tokens: int):
        """``(model inputs, (width, height) of the image, max_new_tokens)``, the last cut to the
        room the context leaves."""
        if not question or not question.strip():
            raise InputError("empty question: type one")
        inputs = encode_prompts(self.loaded, [chat_messages([*history, (question.strip(), None)])], [[image]])
        fix = "start a new chat" + (" or ask a shorter question" if not history else "")
        max_new_tokens = fit_new_tokens(int(inputs["input_ids"].shape[1]), max_new_tokens, self.context_length, fix)
        return inputs, image.size, max_new_tokens

    # ------------------------------------------------------------------ generation
    def _generate(self, encoded, pruning: PruningSpec, streamer, max_new_tokens: int, temperature: float):
        from adsc_patch import pruning as pruned

        inputs = encoded[0]
        block = pruned(self.model, pruning) if pruning.enabled else None
        with torch.inference_mode():
            if block is None:
                return self._call_generate(inputs, streamer, max_new_tokens, temperature), None
            with block as session:
                out = self._call_generate(inputs, streamer, max_new_tokens, temperature)
            return out, session.trace

    def _call_generate(self, inputs, streamer, max_new_tokens, temperature):
        return self.model.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens,
                                   do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                   pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True)

    def _prompt_length(self, encoded) -> int:
        return int(encoded[0]["input_ids"].shape[1])

    def _vision_tokens(self, encoded) -> int:
        inputs = encoded[0]
        image_token = self.model.config.image_token_id
        return int((inputs["input_ids"] == image_token).sum())

    def _mean_vision_tokens(self, trace, encoded) -> float:
        return mean_vision_tokens_per_row(encoded[0], self.model.config.image_token_id, trace)[0]

    def _reply_cost(self, encoded, pruning: PruningSpec, new_tokens: int):
        """The one cost model on this model's shape and the image's own size: each of its grids
        under the schedule this call's plan gives it (``AdscPlan.schedule``)."""
        inputs, (width, height), _ = encoded
        image = image_tokens(self.shape, width, height)
        newline_and_vision = self._vision_tokens(encoded)  # LLaVA-NeXT's newlines share the image token id
        if image.vision_tokens + image.newline_tokens != newline_and_vision:
            raise RuntimeError(f"the cost model counts {image.vision_tokens + image.newline_tokens} tokens for a "
                               f"{width}x{height} image, the processor gave {newline_and_vision}")
        prompt_tokens = int(inputs["input_ids"].shape[1]) - newline_and_vision
        schedules = (None,) * len(image.grids)
        if pruning.enabled:
            plan = hf_plan(self.model, pruning)[1]
            schedules = tuple(plan.schedule(self.num_layers, n) for n in image.grid_tokens)
        workload = Workload(prompt_tokens, 1, new_tokens, 1, torch.finfo(self.model.dtype).bits // 8, width, height)
        return prompt_tokens, grid_schedule_cost(self.shape, pruning.method if pruning.enabled else None, image,
                                                 schedules, workload, budget_fraction=pruning.budget_fraction)

    def _label(self, pruning: PruningSpec):
        if not pruning.enabled:
            return "full", None, "full"
        return pruning.method, pruning.budget_fraction, spec_label(pruning)
