"""``LlavaLlamaForCausalLM``: LLaVA-1.5 on transformers' Llama, with the ADSC config hook.

State-dict keys match upstream (``model.mm_projector.0.weight``,
``model.vision_tower.vision_tower.vision_model.*``), so released checkpoints load as they are.

The ADSC hook is four config fields, saved in ``config.json``:

* ``prune_layers``: 0-based decoder layers at whose input vision tokens are dropped (layer
  ``l`` and every later layer see the reduced set);
* ``drop_ratio``: ``r`` in [0, 1); each prune layer keeps ``floor((1 - r) * N)`` of an
  image's ``N`` remaining vision tokens;
* ``vision_token_budget``: the average vision tokens over all layers the ratio was solved
  for (informational once solved; a config with a budget and ratio 0 is solved on load);
* ``prune_selection``: ``uniform_2d`` (spatial lattice, default), ``uniform_1d`` or ``random``;
* ``prune_method``: ``adsc`` (positional selection, default), ``fastv`` or ``pdrop``
  (attention-ranked, in the decoder), or ``tome``, ``visionzip``, ``pool`` (the image's
  tokens reduced before the decoder, to ``vision_token_budget`` each; ``prune_layers``
  empty). ``docs/methods.md`` describes them.

Empty ``prune_layers`` or ``drop_ratio == 0`` runs transformers' own ``LlamaModel.forward``.
"""

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.generation.utils import GenerateOutput
from transformers.utils import logging as hf_logging
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from adsc_patch import (
    PRUNE_METHODS,
    AdscPlan,
    PruningTrace,
    ScheduleError,
    compact_labels,
    pruned_decoder_forward,
    resolve,
    solve_drop_ratio,
    vision_schedule,
)
from adsc_patch import compat
from adsc_patch.adapters import adapter_for
from adsc_patch.decoder import last_prefill_trace, record_prefill_trace
from adsc_patch.methods import is_pre_llm
from adsc_patch.prellm import PreLlmPlan, pre_llm_trace, reduce_images
from adsc_patch.resolve import HostFacts
from adsc_patch.scores import answer_query_mask
from adsc_patch.select import SELECTIONS
from adsc_patch.spec import PruningSpec
from adsc_patch.tower import layers_run

from ...constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..llava_arch import MultimodalInputs, assign_images_to_markers, image_markers_per_row, splice_image_features
from ..multimodal_encoder.builder import build_vision_tower
from ..multimodal_projector.builder import build_vision_projector
from ..pruning_setting import PruningSetting, active_pruning, active_record, pruning_override

logger = logging.getLogger(__name__)

__all__ = ["LlavaConfig", "LlavaLlamaModel", "LlavaLlamaForCausalLM", "LlavaCausalLMOutput"]


@strict
class LlavaConfig(LlamaConfig):
    """Llama config plus upstream LLaVA's ``mm_*`` fields and the ADSC pruning fields."""

    model_type = "llava_llama"

    mm_vision_tower: str | None = None
    mm_vision_config: dict | None = None
    mm_hidden_size: int | None = None
    mm_projector_type: str = "linear"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_patch_merge_type: str = "flat"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    use_mm_proj: bool = True
    image_aspect_ratio: str | None = "pad"
    tokenizer_model_max_length: int | None = None
    tokenizer_padding_side: str = "right"
    tune_mm_mlp_adapter: bool = False
    freeze_mm_mlp_adapter: bool = False
    conv_mode: str | None = None
    prune_layers: list[int] | None = None
    drop_ratio: float | int = 0.0
    vision_token_budget: float | int | None = None
    prune_selection: str = "uniform_2d"
    prune_method: str = "adsc"

    def __post_init__(self, **kwargs):
        if self.prune_layers is None:
            self.prune_layers = []
        self.prune_layers = [int(layer) for layer in self.prune_layers]
        self.drop_ratio = float(self.drop_ratio)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        if self.prune_selection not in SELECTIONS:
            raise ScheduleError(f"prune_selection {self.prune_selection!r}: expected one of {SELECTIONS}")
        if self.prune_method not in PRUNE_METHODS:
            raise ScheduleError(f"prune_method {self.prune_method!r}: expected one of {tuple(PRUNE_METHODS)}")
        if is_pre_llm(self.prune_method) and self.prune_layers:
            raise ScheduleError(f"prune_method {self.prune_method} reduces the image before the language model: "
                                f"prune_layers must be empty, got {self.prune_layers}")
        # Layer range and ratio; counts need the vision tower and are checked by the model.
        vision_schedule(self.num_hidden_layers, 1, self.prune_layers, 0.0)
        if not 0.0 <= self.drop_ratio < 1.0:
            raise ScheduleError(f"drop_ratio must be in [0, 1), got {self.drop_ratio}")


@dataclass
class LlavaCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``token_positions``.

    When vision tokens were pruned, ``logits`` cover the slots of the last stage (surviving
    vision tokens, all text, left padding), not the whole spliced sequence;
    ``token_positions[b, i]`` is the spliced-sequence index of slot ``i`` (``-1`` for
    padding). ``None`` means logits align with the spliced sequence.
    """

    token_positions: torch.Tensor | None = None


class LlavaLlamaModel(LlamaModel):
    """``LlamaModel`` plus ``vision_tower`` and ``mm_projector`` (upstream's attribute names)."""

    config: LlavaConfig

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        if config.mm_vision_tower:
            self.vision_tower = build_vision_tower(config)
            self.mm_projector = build_vision_projector(config)
            self.post_init()
            self.validate_pruning()

    def get_vision_tower(self):
        return getattr(self, "vision_tower", None)

    def mm_projector_dtype(self) -> torch.dtype:
        weights = list(self.mm_projector.parameters())
        return weights[0].dtype if weights else self.embed_tokens.weight.dtype

    def adsc_plan(self) -> AdscPlan:
        """The pruning plan the config asks for (a disabled plan when nothing is pruned in the
        decoder, which includes the pre-LLM methods)."""
        tower = self.get_vision_tower()
        setting = active_pruning(self.config)
        if is_pre_llm(setting.prune_method):
            return AdscPlan()
        grid = None
        if tower is not None and tower.select_feature == "patch":
            side = tower.num_patches_per_side
            grid = (side, side)
        return AdscPlan(
            prune_layers=setting.prune_layers,
            drop_ratio=setting.drop_ratio,
            selection=setting.prune_selection,
            tokens_per_image=tower.num_patches if tower is not None else None,
            grid=grid,
            method=setting.prune_method,
        )

    def validate_pruning(self) -> None:
        """Check (or solve, when only a budget is given) the schedule for this model's images."""
        tower = self.get_vision_tower()
        if tower is None or not self.config.prune_layers:
            return
        layers, n = self.config.num_hidden_layers, tower.num_patches
        if self.config.vision_token_budget is not None and self.config.drop_ratio == 0:
            schedule = solve_drop_ratio(layers, n, self.config.prune_layers, self.config.vision_token_budget)
            self.config.drop_ratio = schedule.drop_ratio
        vision_schedule(layers, n, self.config.prune_layers, self.config.drop_ratio)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        vision_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """``LlamaModel.forward``, or the pruned loop when the config asks for pruning.

        The KV cache comes as ``cache`` or ``past_key_values`` (either transformers release).
        ``query_mask``: the tokens whose attention ranks vision tokens (score-based methods;
        ``None``: the last prompt token).
        """
        cache = compat.take_cache(kwargs, where="LlavaLlamaModel.forward")
        compat.reject_stray_cache(kwargs, "LlavaLlamaModel.forward")
        plan = self.adsc_plan()
        if plan.enabled:
            record = active_record(self.config)
            outputs = pruned_decoder_forward(
                self,
                plan,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                vision_mask=vision_mask,
                query_mask=query_mask,
                on_trace=None if record is None else functools.partial(setattr, record, "trace"),
                **kwargs,
            )
            return outputs
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **compat.cache_kwargs(cache),
            **kwargs,
        )


class LlavaLlamaForCausalLM(LlamaForCausalLM):
    """LLaVA-1.5: CLIP tower -> projector -> Llama, with batched ``generate`` and ADSC."""

    config: LlavaConfig

    def __init__(self, config: LlavaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The schedule the loaded checkpoint records (see ``recorded_pruning``); ``None`` until
        # ``from_pretrained`` reads one, and never changed by ``configure_pruning``.
        self.recorded_pruning: PruningSetting | None = None
        self.post_init()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_missing_projector: bool = False, **kwargs):
        """``PreTrainedModel.from_pretrained`` that never hides missing multimodal weights.

        Vision-tower weights absent from the checkpoint (as in released LLaVA-1.5) are read
        from ``mm_vision_tower``. A missing projector raises unless
        ``allow_missing_projector`` (the caller then loads it, e.g. from ``mm_projector.bin``).
        Any other missing weight raises.
        """
        want_info = kwargs.pop("output_loading_info", False)
        # transformers' own report would call the vision tower "newly initialized"; we
        # account for every missing key below instead.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if info.get("unexpected_keys"):
            logger.warning(
                "%s holds weights the model does not use: %s",
                pretrained_model_name_or_path,
                sorted(info["unexpected_keys"])[:8],
            )
        missing = set(info.get("missing_keys", ()))
        tower_missing = {k for k in missing if k.startswith("model.vision_tower.")}
        projector_missing = {k for k in missing if k.startswith("model.mm_projector")}
        other_missing = missing - tower_missing - projector_missing
        if other_missing:
            raise ValueError(
                f"{pretrained_model_name_or_path} lacks weights of the language model: {sorted(other_missing)[:8]}"
            )
        if projector_missing and not allow_missing_projector:
            raise ValueError(
                f"{pretrained_model_name_or_path} has no projector weights ({sorted(projector_missing)}); "
                "it is a language model or a LoRA/projector-only output: load it with "
                "llava.model.builder.load_pretrained_model(model_path, model_base=...)"
            )
        tower = model.get_vision_tower()
        if tower is not None and tower_missing:
            tower.load_pretrained_weights()
        recorded = PruningSetting.of_config(model.config)
        model.recorded_pruning = recorded if recorded.enabled else None
        return (model, info) if want_info else model

    def get_model(self) -> LlavaLlamaModel:
        return self.model

    def get_vision_tower(self):
        return self.model.get_vision_tower()

    # ------------------------------------------------------------------ ADSC
    def configure_pruning(
        self,
        prune_layers=None,
        drop_ratio: float | None = None,
        vision_token_budget: float | None = None,
        selection: str | None = None,
        method: str | None = None,
    ):
        """Set the pruning schedule on the config (training, eval and the CLIs); the arguments
        are ``resolve_pruning``'s, or one ``adsc_patch.PruningSpec`` in their place. Returns the
        ``VisionSchedule`` in effect (``None`` without a vision tower); a refused request
        changes nothing."""
        if isinstance(prune_layers, PruningSpec):
            setting, schedule = self.resolve_spec(prune_layers)
        else:
            setting, schedule = self.resolve_pruning(prune_layers, drop_ratio, vision_token_budget, selection, method)
        setting.store(self.config)
        return schedule

    def pruning_host(self) -> HostFacts:
        """What resolving a pruning request needs to know about this model (``adsc_patch.resolve``)."""
        tower = self.get_vision_tower()
        if tower is None:
            return HostFacts(self.config.num_hidden_layers, None, None)
        layout = adapter_for(self).image_layout(self)
        return HostFacts(self.config.num_hidden_layers, layout.tokens, layout.grid,
                         layers_run(tower.config.num_hidden_layers, tower.select_layer))

    def resolve_spec(self, spec: PruningSpec) -> tuple[PruningSetting, object]:
        """``resolve_pruning`` of an ``adsc_patch.PruningSpec`` (a ``budget_fraction`` taken of
        this model's vision tokens per image)."""
        return resolve.resolve_spec(self.pruning_host(), PruningSetting.of_config(self.config), self.recorded_pruning,
                                    spec)

    def resolve_pruning(
        self,
        prune_layers=None,
        drop_ratio: float | None = None,
        vision_token_budget: float | None = None,
        selection: str | None = None,
        method: str | None = None,
    ) -> tuple[PruningSetting, object]:
        """The ``PruningSetting`` (and its ``VisionSchedule``) a request means, changing nothing:
        ``configure_pruning`` stores it on the config, ``generate(..., pruning=setting)`` and
        ``pruned_as(setting)`` use it for one call (the demo serves two settings at once so).
        The policy is ``adsc_patch.resolve.resolve_request``'s:

        Give ``drop_ratio`` or ``vision_token_budget`` (solved for ``prune_layers``), not
        both; with neither, a budget saved in the config is solved again for the (possibly
        new) layers, else the saved ratio stays. A ratio or budget without layers (none given,
        none saved) uses the method's default layers (ADSC's 2, 6, 12, 20 at 32 layers), as
        training does, and logs it. ``prune_layers=[]`` or ``drop_ratio=0`` turns pruning off.

        ``method`` (default: the saved ``prune_method``) is a registered method
        (``adsc_patch.methods``); a new method without ``prune_layers`` takes the loaded
        checkpoint's recorded layers where they fit it (``recorded_prune_layers``: FastV the
        first), else its own default layers, not the saved ones of another method. Saved
        layers that do not fit a method (``PruneMethod.fits_layers``: FastV prunes at one
        layer ``K``, default 2) give way to its defaults; the pre-LLM methods (``tome``,
        ``visionzip``, ``pool``) take no prune layers, a budget (or a ratio, read as
        ``floor((1 - r) * N)`` tokens) of tokens per image, and store it as
        ``vision_token_budget`` with ``prune_layers`` empty. The saved values are the
        config's (a setting active for the call does not change them).
        """
        return resolve.resolve_request(self.pruning_host(), PruningSetting.of_config(self.config),
                                       self.recorded_pruning, prune_layers, drop_ratio, vision_token_budget,
                                       selection, method)

    def recorded_prune_layers(self, method: str) -> tuple[int, ...]:
        """The loaded checkpoint's recorded prune layers as ``method`` takes them
        (``PruneMethod.layers_on_recorded``); ``()`` when it records none."""
        return resolve.recorded_layers(self.pruning_host(), self.recorded_pruning, method)

    def prune_layers_for(self, method: str) -> tuple[int, ...]:
        """The layers ``method`` prunes at on this model when none are given: the config's when it
        is the configured method, else the checkpoint's recorded layers where they fit it, else
        the method's defaults (none for the pre-LLM methods)."""
        return resolve.layers_for(self.pruning_host(), PruningSetting.of_config(self.config), self.recorded_pruning,
                                  method)

    def reachable_budgets(self, method: str, prune_layers=None) -> tuple[int, int]:
        """``(lowest, highest)`` whole-token budgets ``method`` can reach on this model at
        ``prune_layers`` (default: ``prune_layers_for(method)``); ``ScheduleError`` for bad layers."""
        return resolve.reachable_budgets(self.pruning_host(), PruningSetting.of_config(self.config),
                                         self.recorded_pruning, method, prune_layers)

    def solve_schedule(self, budget: float, prune_layers, method: str | None = None):
        """The ``VisionSchedule`` that ``configure_pruning(prune_layers, vision_token_budget=budget,
        method=method)`` would set, without setting it (the curriculum solves its phases so)."""
        return resolve.solve_for_host(self.pruning_host(), method or self.config.prune_method, budget,
                                      list(prune_layers) if prune_layers else None).schedule

    def pre_llm_plan(self) -> PreLlmPlan | None:
        """The plan of a pre-LLM method in effect (``None``: none, or no budget)."""
        return resolve.pre_llm_plan(self.pruning_host(), active_pruning(self.config))

    def vision_schedule(self):
        """The ``VisionSchedule`` of the current config for one image (for a pre-LLM method:
        all patches before layer 0, its emitted count in every decoder layer)."""
        return resolve.schedule_of(self.pruning_host(), active_pruning(self.config))

    @property
    def pruning_trace(self) -> PruningTrace | None:
        """Survivors and per-layer token counts of the last pruned prefill (inside
        ``pruned_as``: of the last one in this context)."""
        record = active_record(self.config)
        if record is not None:
            return record.trace
        return last_prefill_trace(self.model)

    @contextmanager
    def pruned_as(self, setting: PruningSetting | PruningSpec | None):
        """Calls in the block prune as ``setting`` (from ``resolve_pruning``, or a
        ``PruningSpec``), in this thread or task only, the config untouched; yields a
        ``CallRecord`` that receives the prefill's trace. ``None``: the config's own setting."""
        if isinstance(setting, PruningSpec):
            setting = self.resolve_spec(setting)[0]
        with pruning_override(self.config, setting or active_pruning(self.config)) as record:
            yield record

    # ------------------------------------------------------------------ multimodal inputs
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` -> ``(n, num_patches, hidden_size)`` projected features; with a
        pre-LLM method ``(n, k, hidden_size)``."""
        return self._encode_images(images)[0]

    def _encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected features and, for a pre-LLM method, its merge groups (``None`` otherwise)."""
        tower = self.get_vision_tower()
        plan = self.pre_llm_plan()
        groups = None
        if plan is None:
            features = tower(images)
        else:
            pixels = images.to(device=tower.device, dtype=tower.dtype)
            reduction = reduce_images(plan, tower.vision_tower, pixels, tower.select_layer)
            features, groups = reduction.features, reduction.groups
        return self.model.mm_projector(features.to(self.model.mm_projector_dtype())), groups

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images,
        padding_side: str | None = None,
    ) -> MultimodalInputs:
        """Encode the images a batch uses and splice them at their markers."""
        if self.get_vision_tower() is None:
            raise ValueError("this model has no vision tower; prompts cannot contain <image>")
        image_list = _flatten_images(images)
        markers = image_markers_per_row(input_ids, attention_mask)
        assignment = assign_images_to_markers(markers, len(image_list))
        used = sorted({i for row in assignment for i in row})
        features_by_image, merge_groups = {}, None
        if used:
            pixel = torch.stack([image_list[i] for i in used])
            encoded, merge_groups = self._encode_images(pixel)
            features_by_image = dict(zip(used, encoded))
        per_row = [[features_by_image[i] for i in row] for row in assignment]
        side = padding_side or _padding_side(attention_mask, self.config.tokenizer_padding_side)
        spliced = splice_image_features(
            input_ids,
            attention_mask,
            labels,
            per_row,
            self.model.embed_tokens,
            padding_side=side,
            max_length=self.config.tokenizer_model_max_length if labels is not None else None,
        )
        if merge_groups is not None:
            # a pre-LLM method: nothing drops in the decoder, the trace is the merge
            trace = pre_llm_trace(spliced.vision_mask, spliced.attention_mask, self.config.num_hidden_layers,
                                  merge_groups)
            record_prefill_trace(self.model, trace)
            record = active_record(self.config)
            if record is not None:
                record.trace = trace
        return spliced

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.Tensor | list | None = None,
        image_sizes: list | None = None,
        vision_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LlavaCausalLMOutput:
        """Forward with upstream's ``images`` argument.

        ``input_ids`` may contain ``IMAGE_TOKEN_INDEX`` markers (then ``images`` is required);
        the spliced sequence gets position ids from the padding mask. ``image_sizes`` is
        accepted for API compatibility (LLaVA-1.5's square inputs do not use it). The KV
        cache comes as ``cache`` or ``past_key_values`` and is returned in the field the
        installed transformers reads (``adsc_patch.compat``).
        """
        cache = compat.take_cache(kwargs, where="LlavaLlamaForCausalLM.forward")
        compat.reject_stray_cache(kwargs, "LlavaLlamaForCausalLM.forward")
        if inputs_embeds is None and input_ids is not None and bool((input_ids == IMAGE_TOKEN_INDEX).any()):
            if images is None:
                raise ValueError("input_ids contain <image> markers but no images were given")
            spliced = self.prepare_inputs_labels_for_multimodal(input_ids, attention_mask, labels, images)
            input_ids = None
            inputs_embeds = spliced.inputs_embeds
            attention_mask = spliced.attention_mask
            position_ids = spliced.position_ids
            labels = spliced.labels
            vision_mask = spliced.vision_mask
        elif images is not None and cache is None and input_ids is not None:
            raise ValueError(f"{_count_images(images)} image(s) given but the prompts contain no <image> marker")

        # Score-based methods rank with the token before each answer when the answer is in
        # the sequence (training), as they rank with the last prompt token at inference.
        query_mask = answer_query_mask(labels, IGNORE_INDEX) if labels is not None else None
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            vision_mask=vision_mask,
            query_mask=query_mask,
            **compat.cache_kwargs(cache),
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        token_positions = getattr(outputs, "token_positions", None)
        slice_ = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_, :])
        loss = None
        if labels is not None:
            if token_positions is not None:
                labels = compact_labels(labels, token_positions, IGNORE_INDEX)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return LlavaCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            token_positions=token_positions,
            **compat.output_cache_kwargs(compat.output_cache(outputs)),
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: torch.Tensor | list | None = None,
        image_sizes: list | None = None,
        attention_mask: torch.Tensor | None = None,
        pruning: PruningSetting | PruningSpec | None = None,
        **kwargs,
    ) -> GenerateOutput | torch.LongTensor:
        """Batched generation; returns only the new tokens (as upstream).

        ``inputs``: ``(B, L)`` prompt ids with image markers, left- or right-padded (spliced
        rows are re-padded on the left). ``images``: one tensor ``(n, 3, H, W)`` or a list.
        ``pruning``: a ``resolve_pruning`` setting or a ``PruningSpec`` for this call only
        (default: the config's).

        Generation always runs with a KV cache: transformers generates from
        ``inputs_embeds`` (how images enter) only with one and turns ``use_cache=False``
        back on; a warning says so.
        """
        if pruning is not None:
            with self.pruned_as(pruning):
                return self.generate(inputs, images, image_sizes, attention_mask, **kwargs)
        if kwargs.get("use_cache") is False:
            logger.warning("generate(use_cache=False) is ignored: transformers generates from inputs_embeds "
                           "(how images enter the model) only with a KV cache")
        if "inputs_embeds" in kwargs:
            return super().generate(attention_mask=attention_mask, **kwargs)
        if inputs is None:
            raise ValueError("generate needs prompt ids (`inputs`)")
        has_markers = bool((inputs == IMAGE_TOKEN_INDEX).any())
        if has_markers:
            if images is None:
                raise ValueError("the prompts contain <image> markers but no images were given")
            spliced = self.prepare_inputs_labels_for_multimodal(inputs, attention_mask, None, images, padding_side="left")
            return super().generate(
                inputs_embeds=spliced.inputs_embeds,
                attention_mask=spliced.attention_mask,
                vision_mask=spliced.vision_mask,
                **kwargs,
            )
        if images is not None:
            raise ValueError(f"{_count_images(images)} image(s) given but the prompts contain no <image> marker")
        if attention_mask is None:
            attention_mask = torch.ones_like(inputs)
        left = _left_align(inputs, attention_mask)
        return super().generate(
            inputs_embeds=self.model.embed_tokens(left[0]), attention_mask=left[1], **kwargs
        )

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, vision_mask=None, is_first_iteration=False, **kwargs
    ):
        """Hands ``vision_mask`` to the prefill step only (decode steps carry no image)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if model_inputs.get("inputs_embeds") is not None:
            model_inputs["vision_mask"] = vision_mask
        return model_inputs


def _flatten_images(images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return list(images)
        raise ValueError(f"images tensor must be (n, 3, H, W), got shape {tuple(images.shape)}")
    out = []
    for image in images:
        out.extend(_flatten_images(image))
    return out


def _count_images(images) -> int:
    return len(_flatten_images(images))


def _padding_side(attention_mask: torch.Tensor | None, default: str) -> str:
    if attention_mask is None:
        return default
    mask = attention_mask.bool()
    left = bool((~mask[:, 0]).any())
    right = bool((~mask[:, -1]).any())
    if left and not right:
        return "left"
    if right and not left:
        return "right"
    return default


def _left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens to the right end (generation needs left padding)."""
    mask = attention_mask.bool()
    length = mask.shape[1]
    arange = torch.arange(length, device=mask.device)
    order = torch.argsort(torch.where(mask, arange + length, arange), dim=1)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
