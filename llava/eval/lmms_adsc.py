"""Our model in lmms-eval: ``python -m lmms_eval --model adsc --model_args pretrained=P,... --tasks pope``.

Registered through lmms-eval's ``lmms_eval.models`` entry point (setup.py: ``MANIFEST``), as a
"simple" model (the task's ``doc_to_visual`` images and ``doc_to_text`` text). One class for
every checkpoint our entry points load: LLaVA-1.5 (ours, llava-hf, LoRA on its base) prompted
as ``model_vqa_loader`` prompts it (the image's marker, then the question, in the checkpoint's
``conv_mode``), and transformers' Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision prompted by
their own chat template (``llava.model.vlm``). The same batching (left padding) and generation
as our loaders, so the answers are theirs.

Model arguments (``--model_args``, comma-separated ``key=value``):

``pretrained`` (folder or hub id), ``model_base``, ``device``, ``attn_implementation``,
``load_4bit`` / ``load_8bit``, ``conv_template`` (LLaVA-1.5 only); the pruning flags of every
entry point, read by the same parser into one ``PruningSpec`` on top of the checkpoint's own
(``adsc_patch.spec.spec_from_flags``): ``method``, ``prune_layers`` (layers joined by ``;``
or ``-``, or in brackets: ``prune_layers=2;6;12;20``; lmms-eval splits the arguments at commas),
``vision_token_budget``, ``budget_fraction``, ``drop_ratio``, ``prune_selection``,
``no_pruning=True``. An unknown argument or a request that cannot run ends in one line
``error: ...`` before any question is asked.

Per request, the mean vision tokens per decoder layer (from the call's ``PruningTrace``) and
the KV-cache bytes of its batch per request (from ``generate``'s cache) are logged, kept in
``request_stats`` (``summary()`` averages them) and, with ``stats_file=PATH``, appended to that
JSON-lines file (task, doc id, rank, both numbers), a batch at a time: lmms-eval's results file
has no place for a model's own metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import asdict, dataclass

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from adsc_patch import PruningSpec, ScheduleError, compat
from adsc_patch.cache import cache_nbytes

from ..cli import InputError, fail
from ..mm_utils import context_length
from ..model.vlm import chat_messages, encode_prompts, generate_replies, is_transformers_vlm, mean_vision_tokens_per_row
from .inference import _collate_left, answer_batch, encode_question, load_model_from_args, load_vlm_from_args
from .pruning_args import apply_pruning_args, vlm_spec_from_args

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST", "AdscLmms", "RequestStats", "parse_model_args"]

MANIFEST = ModelManifest(model_id="adsc", simple_class_path="llava.eval.lmms_adsc.AdscLmms", aliases=("llava_adsc",))

# --model_args name -> the entry points' flag (its argparse dest)
_PRUNING_ARGS = {"method": "prune_method", "prune_layers": "prune_layers", "vision_token_budget": "vision_token_budget",
                 "budget_fraction": "budget_fraction", "drop_ratio": "drop_ratio", "prune_selection": "prune_selection",
                 "no_pruning": "no_pruning"}
_MODEL_ARGS = ("pretrained", "model_base", "device", "attn_implementation", "load_4bit", "load_8bit", "conv_template",
               "batch_size", "max_batch_size", "max_new_tokens", "stats_file")


@dataclass(frozen=True)
class RequestStats:
    """One answered request: its task and doc id, its mean vision tokens per decoder layer and
    its share of its batch's KV cache (bytes / batch size)."""

    task: str
    doc_id: int
    mean_vision_tokens: float
    kv_bytes: float


def _layers(value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [int(value)]
    text = str(value).strip().strip("[]\"'")
    try:
        return [int(part) for part in re.split(r"[;\-\s,]+", text) if part]
    except ValueError:
        raise InputError(f"prune_layers={value!r}: expected layer indices joined by ';' (e.g. 2;6;12;20)") from None


def parse_model_args(kwargs: dict) -> tuple[dict, argparse.Namespace]:
    """``(model arguments, the pruning flags as the entry points' parser leaves them)`` of
    lmms-eval's keyword arguments; an unknown one is an ``InputError`` naming it."""
    unknown = sorted(set(kwargs) - set(_MODEL_ARGS) - set(_PRUNING_ARGS))
    if unknown:
        raise InputError(f"--model_args {', '.join(unknown)}: unknown to the adsc model (known: "
                         f"{', '.join(_MODEL_ARGS + tuple(_PRUNING_ARGS))})")
    flags = argparse.Namespace(**{dest: None for dest in _PRUNING_ARGS.values()})
    for name, dest in _PRUNING_ARGS.items():
        value = kwargs.get(name)
        if value is None or value == "None":
            continue
        if name == "prune_layers":
            value = _layers(value)
        elif name in ("vision_token_budget", "budget_fraction", "drop_ratio"):
            value = float(value)
        elif name == "no_pruning":
            value = value is True or str(value).lower() == "true"
        setattr(flags, dest, value)
    flags.no_pruning = bool(flags.no_pruning)
    return {name: kwargs[name] for name in _MODEL_ARGS if name in kwargs}, flags


def _truthy(value) -> bool:
    return value is True or str(value).lower() == "true"


class AdscLmms(lmms):
    """lmms-eval's "simple" model over any checkpoint our entry points load, pruned by one spec."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 1, **kwargs):
        super().__init__()
        try:
            model_args, flags = parse_model_args(kwargs)
        except InputError as error:
            fail(error)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(model_args.get("max_new_tokens", 128))
        self.stats_file = model_args.get("stats_file")
        load = argparse.Namespace(model_path=pretrained, model_base=model_args.get("model_base"),
                                  device=model_args.get("device"), vision_tower=None,
                                  attn_implementation=model_args.get("attn_implementation"),
                                  load_4bit=_truthy(model_args.get("load_4bit")),
                                  load_8bit=_truthy(model_args.get("load_8bit")), conv_mode=None)
        self.request_stats: list[RequestStats] = []
        self.vlm = None
        try:
            if is_transformers_vlm(pretrained, load.model_base):
                if model_args.get("conv_template"):
                    raise InputError("conv_template: this checkpoint is prompted with its own chat template")
                self.vlm = load_vlm_from_args(load)
                self.spec = vlm_spec_from_args(self.vlm, flags)
                self.model, self.tokenizer = self.vlm.model, self.vlm.tokenizer
                self.context = self.vlm.context_length
            else:
                self.tokenizer, self.model, self.image_processor, _ = load_model_from_args(load)
                apply_pruning_args(self.model, flags)
                self.spec = PruningSpec.from_config(self.model.config)
                self.conv_mode = model_args.get("conv_template") or self.model.config.conv_mode or "vicuna_v1"
                self.context = context_length(self.model.config)
        except (InputError, ScheduleError) as error:
            fail(error)
        self._device = self.model.device
        logger.info("adsc model %s: pruning %s", pretrained, self.spec.to_dict() if self.spec.enabled else "none")

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ one batch
    def _generation(self, gen_kwargs: dict) -> dict:
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        return dict(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                    top_p=gen_kwargs.get("top_p"), num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
                    max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                    pad_token_id=self.tokenizer.pad_token_id, use_cache=True)

    def _answer(self, contexts: list[str], visuals: list[list], gen_kwargs: dict, keys: list[tuple]) -> list[str]:
        """Answers of one batch (each context with its images; ``keys``: their (task, doc id)), cut
        at ``until``; records their stats."""
        generation = self._generation(gen_kwargs)
        if self.vlm is not None:
            inputs = encode_prompts(self.vlm, [chat_messages([(text, None)], [len(images)])
                                               for text, images in zip(contexts, visuals)], visuals)
            reply = generate_replies(self.vlm, inputs, self.spec, **generation)
            texts, trace, output = reply.texts, reply.trace, reply.output
            means = mean_vision_tokens_per_row(inputs, self.model.config.image_token_id, trace)
        else:
            if any(len(images) > 1 for images in visuals):
                raise InputError("LLaVA-1.5 answers about one image per question; this task gives several")
            items = [(row, *encode_question(text, images[0] if images else None, self.tokenizer,
                                            self.image_processor, self.model.config, self.conv_mode))
                     for row, (text, images) in enumerate(zip(contexts, visuals))]
            _, input_ids, mask, pixels, _ = _collate_left(self.tokenizer.pad_token_id)(items)
            answers = answer_batch(self.model, self.tokenizer, input_ids, mask, pixels, generation, self.context)
            texts, trace, output = answers.texts, answers.trace, answers.output
            means = self._llava_mean_vision_tokens(trace, len(texts))
        kv = cache_nbytes(compat.output_cache(output)) / len(texts)
        stats = [RequestStats(task, doc_id, mean, kv) for (task, doc_id), mean in zip(keys, means)]
        for item in stats:
            logger.info("%s doc %s: %.1f vision tokens per layer, KV %.3f MB", item.task, item.doc_id,
                        item.mean_vision_tokens, item.kv_bytes / 1e6)
        self.request_stats += stats
        if self.stats_file:
            payload = "".join(json.dumps({**asdict(item), "rank": self.rank}) + "\n" for item in stats)
            with open(self.stats_file, "a") as f:
                f.write(payload)
        until = [stop for stop in (gen_kwargs.get("until") or []) if stop]
        return [_cut(text, until) for text in texts]

    def _llava_mean_vision_tokens(self, trace, rows: int) -> list[float]:
        num_patches = self.model.get_vision_tower().num_patches
        layers = self.model.config.num_hidden_layers
        if trace is None:
            return [float(num_patches)] * rows
        from ..serve.chat import mean_vision_tokens

        return [mean_vision_tokens(trace, layers, num_patches, row) for row in range(rows)]

    # ------------------------------------------------------------------ lmms-eval's API
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        return [image.convert("RGB") for image in (visuals or [])]

    def generate_until(self, requests) -> list[str]:
        """Batches of ``batch_size`` requests with the same generation arguments, in order."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            for first in range(0, len(indices), self.batch_size):
                batch = indices[first:first + self.batch_size]
                contexts, visuals, keys = [], [], []
                for index in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    contexts.append(context)
                    visuals.append(self._visuals(doc_to_visual, task, split, doc_id))
                    keys.append((task, doc_id))
                texts = self._answer(contexts, visuals, dict(requests[batch[0]].args[1]), keys)
                for index, text in zip(batch, texts):
                    results[index] = text
        return results

    def generate_until_multi_round(self, requests) -> list:
        """Each request's rounds in turn: round 0 its context and images, later rounds what the
        task's ``doc_to_text`` gives for the previous answers, until it says the last round."""
        results = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            answers, round_info, round_index = [], None, 0
            while True:
                if round_index:
                    visuals, context, last, answers, round_info = doc_to_text(
                        self._doc(task, split, doc_id), previous_output=answers, round_idx=round_index,
                        previous_round_info=round_info)
                    answers = list(answers)
                    visuals = [image.convert("RGB") for image in (visuals or [])]
                    if last:
                        break
                answers.append(self._answer([context], [visuals], dict(gen_kwargs), [(task, doc_id)])[0])
                round_index += 1
            results.append(tuple(answers))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context (with the images) and whether
        greedy decoding would produce it, one request at a time."""
        results = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):
                continuation = continuation(self._doc(task, split, doc_id))
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            results.append(self._loglikelihood(context, continuation, visuals))
        return results

    def _loglikelihood(self, context: str, continuation: str, visuals: list) -> tuple[float, bool]:
        if self.vlm is not None:
            prompt = encode_prompts(self.vlm, [chat_messages([(context, None)], [len(visuals)])], [visuals])
            continuation_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            continuation_ids = continuation_ids.to(self.model.device)
            inputs = dict(prompt, input_ids=torch.cat([prompt["input_ids"], continuation_ids], 1),
                          attention_mask=torch.cat([prompt["attention_mask"], torch.ones_like(continuation_ids)], 1))
            if "mm_token_type_ids" in prompt:
                inputs["mm_token_type_ids"] = torch.cat(
                    [prompt["mm_token_type_ids"], torch.zeros_like(continuation_ids)], 1)
            from adsc_patch import pruning

            block = pruning(self.model, self.spec) if self.spec.enabled else None
            with torch.inference_mode():
                if block is None:
                    logits = self.model(**inputs).logits
                else:
                    with block:
                        logits = self.model(**inputs).logits
        else:
            if len(visuals) > 1:
                raise InputError("LLaVA-1.5 answers about one image per question; this task gives several")
            ids, pixels = encode_question(context, visuals[0] if visuals else None, self.tokenizer,
                                          self.image_processor, self.model.config, self.conv_mode)
            continuation_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            input_ids = torch.cat([ids, continuation_ids])[None].to(self.model.device)
            images = None if pixels is None else pixels[None].to(self.model.device, self.model.dtype)
            with torch.inference_mode(), self.model.pruned_as(None):
                logits = self.model(input_ids=input_ids, images=images).logits
            continuation_ids = continuation_ids[None].to(self.model.device)
        # the answer's tokens are the last ones; each is predicted by the position before it
        n = continuation_ids.shape[1]
        predicted = logits[0, -n - 1:-1].float().log_softmax(-1)
        targets = continuation_ids[0]
        logprob = float(predicted.gather(-1, targets[:, None]).sum())
        greedy = bool((predicted.argmax(-1) == targets).all())
        return logprob, greedy

    def summary(self) -> dict:
        """Mean vision tokens per layer and mean KV bytes per request over all answered so far."""
        n = len(self.request_stats)
        if not n:
            return {"requests": 0}
        return {"requests": n, "mean_vision_tokens": sum(s.mean_vision_tokens for s in self.request_stats) / n,
                "mean_kv_bytes": sum(s.kv_bytes for s in self.request_stats) / n}


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first of the ``until`` strings."""
    for stop in until:
        if stop in text:
            text = text.split(stop, 1)[0]
    return text
