"""``apply_adsc`` / ``remove_adsc``: switch vision-token pruning on models we did not write.

Two kinds of model are handled:

* models with the ADSC config hook (they define ``configure_pruning``, like
  ``llava.LlavaLlamaForCausalLM``): the schedule is written to their config;
* transformers' ``LlavaForConditionalGeneration`` / ``LlavaModel`` (llava-hf checkpoints):
  the instance's forwards are swapped, weights and classes untouched (output-capture hooks
  registered by class name keep working). Image positions are read from ``input_ids ==
  config.image_token_id`` at prefill; with ``labels`` the loss is computed over the pruned
  sequence exactly as without pruning (every text target once). The outputs are
  transformers' own classes with their own fields only; which input position each logit
  belongs to is on the trace (``last_trace(model).token_positions``).

``remove_adsc`` restores the original behaviour; ``last_trace`` returns the
``PruningTrace`` of the last pruned prefill.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import compat
from .decoder import AdscPlan, PruningTrace, compact_labels, pruned_decoder_forward
from .methods import IN_LLM_METHODS, PRUNE_METHODS
from .scores import answer_query_mask
from .schedule import ScheduleError, VisionSchedule, solve_drop_ratio, vision_schedule

__all__ = ["apply_adsc", "remove_adsc", "last_trace"]

_PLAN_ATTR = "_adsc_plan"
_POSITIONS_ATTR = "_adsc_token_positions"
_IGNORE_INDEX = -100


def _hf_parts(model):
    """(top model or None, LlavaModel, language model) of a transformers Llava model."""
    from transformers import LlavaForConditionalGeneration, LlavaModel

    if isinstance(model, LlavaForConditionalGeneration):
        return model, model.model, model.model.language_model
    if isinstance(model, LlavaModel):
        return None, model, model.language_model
    raise TypeError(
        f"apply_adsc supports models with a configure_pruning hook and transformers' "
        f"LlavaForConditionalGeneration/LlavaModel; got {type(model).__name__}"
    )


def _hf_tokens_per_image(config) -> tuple[int, tuple[int, int] | None]:
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if config.vision_feature_select_strategy == "default":
        return side * side, (side, side)
    return side * side + 1, None


def _resolve_schedule(num_layers, num_tokens, prune_layers, drop_ratio, vision_token_budget) -> VisionSchedule:
    if (drop_ratio is None) == (vision_token_budget is None):
        raise ScheduleError("give exactly one of drop_ratio or vision_token_budget")
    if vision_token_budget is not None:
        return solve_drop_ratio(num_layers, num_tokens, prune_layers, vision_token_budget)
    return vision_schedule(num_layers, num_tokens, prune_layers, drop_ratio)


def apply_adsc(
    model,
    prune_layers,
    drop_ratio: float | None = None,
    vision_token_budget: float | None = None,
    selection: str = "uniform_2d",
    method: str = "adsc",
) -> VisionSchedule:
    """Prune vision tokens at ``prune_layers`` with ``drop_ratio`` (or the ratio meeting
    ``vision_token_budget`` average tokens) by ``method``. Returns the schedule for one
    image; a bad request raises ``ScheduleError`` before the model is touched.

    llava-hf models take the in-decoder methods (``adsc``, ``fastv``, ``pdrop``); models with
    the config hook take every method."""
    if hasattr(model, "configure_pruning"):
        if (drop_ratio is None) == (vision_token_budget is None):
            raise ScheduleError("give exactly one of drop_ratio or vision_token_budget")
        return model.configure_pruning(
            prune_layers=list(prune_layers),
            drop_ratio=drop_ratio,
            vision_token_budget=vision_token_budget,
            selection=selection,
            method=method,
        )
    if method not in IN_LLM_METHODS:
        known = ", ".join(IN_LLM_METHODS)
        raise ScheduleError(f"prune method {method!r}: the llava-hf patch runs the in-decoder methods ({known})"
                            if method in PRUNE_METHODS else f"unknown prune method {method!r}; known: "
                            f"{', '.join(PRUNE_METHODS)}")
    top, llava_model, language_model = _hf_parts(model)
    config = llava_model.config
    num_tokens, grid = _hf_tokens_per_image(config)
    try:
        schedule = _resolve_schedule(
            config.text_config.num_hidden_layers, num_tokens, prune_layers, drop_ratio, vision_token_budget
        )
        plan = AdscPlan(schedule.prune_layers, schedule.drop_ratio, selection, num_tokens, grid, method)
    except ScheduleError as error:
        raise ScheduleError(f"prune method {method}: {error}") from None
    setattr(language_model, _PLAN_ATTR, plan)
    _install(language_model, _language_model_forward)
    _install(llava_model, _llava_model_forward)
    if top is not None:
        _install(top, _top_forward)
    return schedule


def _install(module, forward) -> None:
    """Set ``forward`` on this instance only, showing the class forward's signature (generate
    inspects it to validate its keyword arguments)."""

    @functools.wraps(type(module).forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    module.forward = types.MethodType(wrapper, module)


def remove_adsc(model) -> None:
    """Undo ``apply_adsc``: the model computes on all tokens again."""
    if hasattr(model, "configure_pruning"):
        model.configure_pruning(prune_layers=[], drop_ratio=0.0)
        return
    top, llava_model, language_model = _hf_parts(model)
    for module in (top, llava_model, language_model):
        if module is not None and "forward" in vars(module):
            del module.forward
    for attr in (_PLAN_ATTR, _POSITIONS_ATTR):
        if hasattr(language_model, attr):
            delattr(language_model, attr)


def last_trace(model) -> PruningTrace | None:
    """The ``PruningTrace`` of the last pruned prefill of ``model`` (``None`` if none ran)."""
    if hasattr(model, "pruning_trace"):
        return model.pruning_trace
    _, _, language_model = _hf_parts(model)
    return getattr(language_model, "adsc_trace", None)


def _language_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                            use_cache=None, adsc_vision_mask=None, adsc_query_mask=None, **kwargs):
    plan: AdscPlan = getattr(self, _PLAN_ATTR)
    cache = compat.take_cache(kwargs, where="the language model's forward")
    compat.reject_stray_cache(kwargs, "the language model's forward")
    if not plan.enabled:
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **compat.cache_kwargs(cache), **kwargs,
        )
    outputs = pruned_decoder_forward(
        self, plan, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, vision_mask=adsc_vision_mask,
        query_mask=adsc_query_mask, **kwargs,
    )
    setattr(self, _POSITIONS_ATTR, outputs.token_positions)
    # transformers' LlavaModel builds its own output from every field of this one: only
    # BaseModelOutputWithPast's fields may be on it (the positions travel on the module).
    return BaseModelOutputWithPast(
        last_hidden_state=outputs.last_hidden_state, **compat.output_cache_kwargs(compat.output_cache(outputs))
    )


def _llava_model_forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                         inputs_embeds=None, **kwargs):
    cache = compat.take_cache(kwargs, where="LlavaModel.forward")
    compat.reject_stray_cache(kwargs, "LlavaModel.forward")
    vision_mask = None
    if input_ids is not None:
        vision_mask = input_ids == self.config.image_token_id
    elif inputs_embeds is not None and (pixel_values is not None or kwargs.get("mm_encoder_outputs") is not None):
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        vision_mask = (inputs_embeds == image_embedding).all(-1)
    if vision_mask is not None and not bool(vision_mask.any()):
        vision_mask = None
    setattr(self.language_model, _POSITIONS_ATTR, None)
    return type(self).forward(
        self, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
        position_ids=position_ids, inputs_embeds=inputs_embeds, adsc_vision_mask=vision_mask,
        **compat.cache_kwargs(cache), **kwargs,
    )


def _top_forward(self, *args, labels=None, **kwargs):
    if labels is not None and getattr(self.model.language_model, _PLAN_ATTR).method != "adsc":
        # score-based methods rank with the token before each answer in training
        kwargs["adsc_query_mask"] = answer_query_mask(labels, _IGNORE_INDEX)
    outputs = type(self).forward(self, *args, **kwargs)
    positions = getattr(self.model.language_model, _POSITIONS_ATTR, None)
    if labels is not None:
        if positions is not None:
            labels = compact_labels(labels, positions, _IGNORE_INDEX)
        loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
        outputs["loss"] = self.loss_function(
            logits=outputs.logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **loss_kwargs
        )
    return outputs
