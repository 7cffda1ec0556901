"""``apply_adsc`` / ``remove_adsc``: switch vision-token pruning on models we did not write.

The model's adapter (``adapters.adapter_for``, by ``config.model_type``) says which of two
kinds it is:

* models with the ADSC config hook (``llava.LlavaLlamaForCausalLM``, adapter
  ``config_hook``): the schedule is written to their config;
* transformers' architectures (``llava``: ``LlavaForConditionalGeneration`` /
  ``LlavaModel``, llava-hf checkpoints): the instance's forwards are swapped at the parts
  the adapter names, weights and classes untouched (output-capture hooks
  registered by class name keep working). Image positions are read from ``input_ids ==
  config.image_token_id`` at prefill (the adapter's ``vision_mask``); with ``labels`` the loss is computed over the pruned
  sequence exactly as without pruning (every text target once). The outputs are
  transformers' own classes with their own fields only; which input position each logit
  belongs to is on the trace (``last_trace(model).token_positions``). What one call passes
  between the patched forwards (the kept slots' positions, for the loss) lives in that
  call's context, never on a module.

``remove_adsc`` restores the original behaviour; ``last_trace`` returns the
``PruningTrace`` of the last pruned prefill. ``adsc_patch.pruning(model, spec)``
(``session``) prunes one block of calls in one thread or task, on the same forwards.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import compat
from .adapters import adapter_for
from .decoder import AdscPlan, PruningTrace, compact_labels, last_prefill_trace, pruned_decoder_forward
from .methods import IN_LLM_METHODS, get_method
from .scores import answer_query_mask
from .schedule import ScheduleError, VisionSchedule, solve_drop_ratio, vision_schedule
from .spec import PruningSpec

__all__ = ["apply_adsc", "remove_adsc", "last_trace"]

_PLAN_ATTR = "_adsc_plan"
_IGNORE_INDEX = -100


def _parts(model):
    """(top model or None, multimodal model, language model) of a patched architecture."""
    parts = adapter_for(model).parts(model)
    return parts.top, parts.multimodal, parts.language_model


def apply_adsc(
    model,
    prune_layers,
    drop_ratio: float | None = None,
    vision_token_budget: float | None = None,
    selection: str = "uniform_2d",
    method: str = "adsc",
) -> VisionSchedule:
    """Prune vision tokens at ``prune_layers`` with ``drop_ratio`` (or the ratio meeting
    ``vision_token_budget`` average tokens) by ``method``, until ``remove_adsc``; or by one
    ``PruningSpec`` given in place of ``prune_layers``. Returns the schedule for one image; a
    bad request raises ``ScheduleError`` before the model is touched. (For one block of calls
    in one thread, ``adsc_patch.pruning(model, spec)``.)

    llava-hf models take the in-decoder methods (``adsc``, ``fastv``, ``pdrop``); models with
    the config hook take every method."""
    if adapter_for(model).config_hook:
        if isinstance(prune_layers, PruningSpec):
            return model.configure_pruning(prune_layers)
        if (drop_ratio is None) == (vision_token_budget is None):
            raise ScheduleError("give exactly one of drop_ratio or vision_token_budget")
        return model.configure_pruning(
            prune_layers=list(prune_layers),
            drop_ratio=drop_ratio,
            vision_token_budget=vision_token_budget,
            selection=selection,
            method=method,
        )
    if isinstance(prune_layers, PruningSpec):
        spec = prune_layers
    elif not prune_layers and drop_ratio is not None and vision_token_budget is None:
        spec = PruningSpec.off()  # a ratio at no layer drops nothing
    else:
        spec = PruningSpec(method, budget=vision_token_budget, drop_ratio=drop_ratio,
                           layers=tuple(sorted(prune_layers)), selection=selection)
    language_model, plan, schedule = hf_plan(model, spec)
    setattr(language_model, _PLAN_ATTR, plan)
    install_forwards(model)
    return schedule


def hf_plan(model, spec: PruningSpec) -> tuple[object, AdscPlan, VisionSchedule | None]:
    """``(language model, plan, per-image schedule)`` of ``spec`` on a transformers model; layers
    ``None`` take the method's own (``PruneMethod.default_layers``). For images of differing
    sizes (the adapter's layout has no fixed size) the schedule is each image's, at the call:
    ``None`` here."""
    rule = get_method(spec.method)
    adapter = adapter_for(model)
    if not rule.in_decoder:
        raise ScheduleError(f"prune method {spec.method!r}: the {adapter.name} patch runs the in-decoder methods "
                            f"({', '.join(IN_LLM_METHODS)})")
    if spec.options:
        raise ScheduleError(f"prune method {spec.method} takes no options (got {dict(spec.options)})")
    language_model = adapter.language_model(model)
    layout = adapter.image_layout(model)
    num_tokens, grid = layout.tokens, layout.grid
    num_layers = adapter.num_layers(model)
    layers = rule.default_layers(num_layers) if spec.layers is None else spec.layers
    if layers:
        rule.check_layers(layers)
    if num_tokens is None:  # images differ in size: each gets its own schedule at the call
        if spec.budget is not None:
            raise ScheduleError(f"prune method {spec.method}: this model's images differ in size, so an absolute "
                                f"budget ({spec.budget:g} tokens) means nothing; give budget_fraction or drop_ratio")
        vision_schedule(num_layers, 1, layers, 0.0)  # layer range
        plan = AdscPlan(tuple(layers), spec.drop_ratio or 0.0, spec.selection, None, None, spec.method,
                        budget_fraction=spec.budget_fraction if spec.drop_ratio is None else None)
        return language_model, plan, None
    budget = spec.budget_for(num_tokens)
    try:
        if spec.drop_ratio is not None:
            schedule = vision_schedule(num_layers, num_tokens, layers, spec.drop_ratio)
        else:
            schedule = solve_drop_ratio(num_layers, num_tokens, layers, budget)
        plan = AdscPlan(schedule.prune_layers, schedule.drop_ratio, spec.selection, num_tokens, grid, spec.method)
    except ScheduleError as error:
        raise ScheduleError(f"prune method {spec.method}: {error}") from None
    return language_model, plan, schedule


def install_forwards(model) -> None:
    """The patch's forwards on this instance (idempotent); they prune by the active session's
    plan, else by ``apply_adsc``'s, else call transformers' own."""
    top, llava_model, language_model = _parts(model)
    _install(language_model, _language_model_forward)
    _install(llava_model, _multimodal_forward)
    if top is not None:
        _install(top, _top_forward)


def uninstall_forwards(model) -> None:
    top, llava_model, language_model = _parts(model)
    for module in (top, llava_model, language_model):
        if module is not None and "forward" in vars(module):
            del module.forward


def has_persistent_plan(model) -> bool:
    """Whether ``apply_adsc`` left a plan on the model (``remove_adsc`` not called since)."""
    return getattr(_parts(model)[2], _PLAN_ATTR, None) is not None


def _active_plan(language_model) -> tuple[AdscPlan | None, object]:
    """The plan this call prunes by, and the session to hand the trace to (``None``: none)."""
    from .session import active_session

    session = active_session(language_model)
    if session is not None:
        return session.plan, session
    return getattr(language_model, _PLAN_ATTR, None), None


@dataclass
class _CallState:
    """What one call of a patched model passes between its forwards: the image tokens and
    spans found by the multimodal forward, the query tokens set by the top one (training),
    and the kept slots' positions the language model hands back for the loss."""

    token_positions: torch.Tensor | None = None
    vision_mask: torch.Tensor | None = None
    images: list | None = None
    query_mask: torch.Tensor | None = None
    adapter: object | None = None  # the model's adapter and multimodal module, set by the multimodal forward
    multimodal: object | None = None


_CALL: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("adsc_hf_call", default=None)


@contextmanager
def _call_state():
    """The outermost patched forward of a call opens its state; inner ones share it."""
    outer = _CALL.get()
    if outer is not None:
        yield outer
        return
    token = _CALL.set(_CallState())
    try:
        yield _CALL.get()
    finally:
        _CALL.reset(token)


def _install(module, forward) -> None:
    """Set ``forward`` on this instance only, showing the class forward's signature (generate
    inspects it to validate its keyword arguments)."""

    @functools.wraps(type(module).forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    module.forward = types.MethodType(wrapper, module)


def remove_adsc(model) -> None:
    """Undo ``apply_adsc``: the model computes on all tokens again."""
    if adapter_for(model).config_hook:
        model.configure_pruning(prune_layers=[], drop_ratio=0.0)
        return
    uninstall_forwards(model)
    language_model = _parts(model)[2]
    if hasattr(language_model, _PLAN_ATTR):
        delattr(language_model, _PLAN_ATTR)


def last_trace(model) -> PruningTrace | None:
    """The ``PruningTrace`` of the last pruned prefill of ``model`` (``None`` if none ran)."""
    if adapter_for(model).config_hook:
        return model.pruning_trace
    _, _, language_model = _parts(model)
    return last_prefill_trace(language_model)


def _language_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                            use_cache=None, **kwargs):
    plan, session = _active_plan(self)
    state = _CALL.get() or _CallState()
    cache = compat.take_cache(kwargs, where="the language model's forward")
    compat.reject_stray_cache(kwargs, "the language model's forward")
    if plan is None or not plan.enabled:
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **compat.cache_kwargs(cache), **kwargs,
        )

    def hand_on(trace):
        if session is not None:
            session.trace = trace

    additions = state.adapter.layer_additions(kwargs) if state.adapter is not None else None
    if state.adapter is not None and state.vision_mask is not None and inputs_embeds is not None:
        found = state.adapter.layout_from_embeddings(state.multimodal, state.vision_mask, inputs_embeds)
        if found is not None:
            state.vision_mask, state.images = found
    outputs = pruned_decoder_forward(
        self, plan, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, vision_mask=state.vision_mask,
        query_mask=state.query_mask, on_trace=hand_on, images=state.images,
        additions=additions, **kwargs,
    )
    state.token_positions = outputs.token_positions
    # transformers' LlavaModel builds its own output from every field of this one: only
    # BaseModelOutputWithPast's fields may be on it (the positions travel on the call's state).
    return BaseModelOutputWithPast(
        last_hidden_state=outputs.last_hidden_state, **compat.output_cache_kwargs(compat.output_cache(outputs))
    )


def _multimodal_forward(self, *args, **kwargs):
    """The multimodal model's own forward, after noting on the call's state where this call's
    image tokens are (the adapter's ``vision_mask`` and, for images of differing sizes, its
    ``image_spans``): the language model reads them there, never from a keyword that would
    travel into the vision tower."""
    cache = compat.take_cache(kwargs, where=f"{type(self).__name__}.forward")
    compat.reject_stray_cache(kwargs, f"{type(self).__name__}.forward")
    signature = inspect.signature(type(self).forward)
    call = signature.bind_partial(self, *args, **kwargs).arguments
    call.pop(next(iter(signature.parameters)), None)  # self
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            call.update(call.pop(name, {}))
    adapter = adapter_for(self)
    input_ids, inputs_embeds = call.get("input_ids"), call.get("inputs_embeds")
    # only a call that brings images has image tokens (a generated token may carry the image id)
    brings_images = any(call.get(k) is not None for k in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs",
                                                          "image_grid_thw", "video_grid_thw"))
    if input_ids is not None and brings_images:
        vision_mask = adapter.vision_mask(self, input_ids=input_ids)
    elif inputs_embeds is not None and brings_images:
        vision_mask = adapter.vision_mask(self, inputs_embeds=inputs_embeds)
    else:
        vision_mask = None
    with _call_state() as state:
        state.token_positions = None
        state.vision_mask = vision_mask
        state.adapter = adapter
        state.multimodal = self
        state.images = adapter.image_spans(self, vision_mask, call) if vision_mask is not None else None
        return type(self).forward(self, **call, **compat.cache_kwargs(cache))


def _top_forward(self, *args, labels=None, **kwargs):
    adapter = adapter_for(self)
    plan, _ = _active_plan(adapter.language_model(self))
    with _call_state() as state:
        if labels is not None and plan is not None and plan.rule.score_based:
            # score-based methods rank with the token before each answer in training
            state.query_mask = answer_query_mask(labels, _IGNORE_INDEX)
        outputs = type(self).forward(self, *args, **kwargs)
        positions = state.token_positions
    if labels is not None:
        if positions is not None:
            labels = compact_labels(labels, positions, _IGNORE_INDEX)
        loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
        outputs["loss"] = self.loss_function(
            logits=outputs.logits, labels=labels, vocab_size=adapter.vocab_size(self), **loss_kwargs
        )
    return outputs
