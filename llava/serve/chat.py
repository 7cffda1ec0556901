"""One chat turn with streaming, per-call pruning and per-reply metrics: what the web demo and
the terminal chat share.

``ChatEngine(tokenizer, model, image_processor)`` holds one model in memory. ``stream(image,
history, question, pruning)`` yields the reply as it grows and ends with a ``Reply`` carrying
the text, the metrics (time to first token, tokens/s, mean vision tokens per layer, KV-cache
bytes read off the call's own cache, FLOPs from ``adsc_patch.profile``) and the call's
``PruningTrace``. The pruning setting is an argument of the call (``model.pruned_as``): two
requests with different budgets on one model never share a schedule.

Bad input raises ``InputError`` with one line naming the problem, before the model runs:
no image, a file that is not an image, an image over ``max_image_pixels``, a conversation that
fills the context length by itself (``max_new_tokens`` is cut to the room left, with a log line).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from adsc_patch import PRUNE_METHODS, PruningTrace, compat, resolve
from adsc_patch.cache import cache_nbytes
from adsc_patch.profile import ModelShape, Workload, schedule_cost

from ..cli import InputError
from ..constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from ..conversation import get_conv_template
from ..mm_utils import (ImageLoadError, check_image, context_length, fit_new_tokens, process_images,
                        prompt_length_with_images, tokenizer_image_token)
from ..model.pruning_setting import PruningSetting

logger = logging.getLogger(__name__)

__all__ = ["ChatEngine", "Reply", "ReplyMetrics", "open_image", "mean_vision_tokens", "setting_label", "MAX_IMAGE_PIXELS"]

MAX_IMAGE_PIXELS = 25_000_000  # 5000 x 5000; LLaVA-1.5 sees 336 x 336 anyway


def open_image(path: str | None, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> Image.Image:
    """The RGB image at ``path``; ``InputError`` for none, a non-image or one over ``max_pixels``
    (the size is read from the header, before decoding). Messages call the file ``name``
    (default: its file name; a server's upload folder means nothing to the user)."""
    if not path:
        raise InputError("no image: upload one first")
    name = name or os.path.basename(path)
    try:
        check_image(path)
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(f"{name}: {width} x {height} pixels is over the limit of {max_pixels:,} pixels")
            return image.convert("RGB")
    except ImageLoadError as error:
        raise ImageLoadError(str(error).replace(path, name)) from error.__cause__
    except (OSError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"not a readable image: {name} ({str(error).replace(path, name)})") from error


def mean_vision_tokens(trace: PruningTrace | None, num_layers: int, all_tokens: int, row: int = 0) -> float:
    """Vision tokens per decoder layer, averaged over the layers, read off ``trace``
    (``None``: nothing pruned, every layer saw ``all_tokens``)."""
    if trace is None:
        return float(all_tokens)
    bounds = list(zip((0, *trace.prune_layers), (*trace.prune_layers, num_layers)))
    kept = [len(stage[row]) for stage in trace.kept_vision_positions]
    return sum(k * (end - first) for k, (first, end) in zip(kept, bounds)) / num_layers


def setting_label(setting: PruningSetting) -> str:
    """``full``, ``pool @ 14`` or ``adsc @ 13.4 · layers 1, 4``: what a pane ran."""
    if not setting.enabled:
        return "full"
    label = f"{setting.prune_method} @ {round(setting.vision_token_budget, 2):g}" \
        if setting.vision_token_budget is not None else f"{setting.prune_method} ratio {setting.drop_ratio:.3g}"
    if setting.prune_layers:
        label += f" · layer{'s' if len(setting.prune_layers) > 1 else ''} {', '.join(map(str, setting.prune_layers))}"
    return label


@dataclass
class ReplyMetrics:
    """What one reply cost, its prompt's prefill apart from its answer (MB = 1e6 bytes).

    ``prefill_kv_mb``: the call's cache without the answer's positions (measured);
    ``prefill_gflops``: tower, projector, ranking and the prompt's prefill (cost model);
    ``answer_gflops``: the decode steps; ``kv_mb``: the cache after the last step (measured);
    ``tflops``: everything. ``prompt_tokens`` counts text only (the image's are the vision tokens)."""

    method: str
    budget: float | None
    ttft_ms: float
    tokens_per_s: float | None
    new_tokens: int
    mean_vision_tokens: float
    kv_mb: float
    tflops: float
    prompt_tokens: int
    prefill_kv_mb: float = 0.0
    prefill_gflops: float = 0.0
    answer_gflops: float = 0.0
    label: str = ""

    def prefill_line(self) -> str:
        return (f"{self.label or self.method} — prefill of {self.prompt_tokens} text tokens + image: "
                f"{self.mean_vision_tokens:.1f} vision tokens/layer · KV {self.prefill_kv_mb:.3f} MB · "
                f"{self.prefill_gflops:.3f} GFLOPs · TTFT {self.ttft_ms:.0f} ms")

    def answer_line(self) -> str:
        speed = f"{self.tokens_per_s:.1f} tok/s" if self.tokens_per_s else "— tok/s"
        return (f"answer: {self.new_tokens} tokens · {speed} · {self.answer_gflops:.3f} GFLOPs · "
                f"KV after it {self.kv_mb:.3f} MB")

    def line(self) -> str:
        """Both lines, prefill first."""
        return f"{self.prefill_line()}\n{self.answer_line()}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Reply:
    text: str
    metrics: ReplyMetrics
    trace: PruningTrace | None = None
    history: list = field(default_factory=list)


class _TimedStreamer(TextIteratorStreamer):
    """``TextIteratorStreamer`` that notes when each generated token arrives."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.token_times: list[float] = []

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.token_times.extend([time.perf_counter()] * int(value.numel()))
        super().put(value)


class ChatEngine:
    """One model in memory answering chat turns under any pruning setting."""

    def __init__(self, tokenizer, model, image_processor, conv_mode: str | None = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.conv_mode = conv_mode or model.config.conv_mode or "vicuna_v1"
        self.max_image_pixels = max_image_pixels
        tower = model.get_vision_tower()
        self.shape = ModelShape.from_config(model.config, tower.config)
        self.num_patches = tower.num_patches
        self.num_layers = model.config.num_hidden_layers
        self.context_length = context_length(model.config)

    # ------------------------------------------------------------------ what the demo shows
    budget_label = "vision-token budget (reachable range)"
    budget_step = 1.0
    methods = PRUNE_METHODS  # what the compressed pane offers

    def label(self, setting) -> str:
        """``full``, ``adsc @ 13.4 · layers 1, 4``: what a pane runs under ``setting``."""
        return self._label(setting)[2]

    def prune_layers_for(self, method: str) -> tuple[int, ...]:
        """The layers ``method`` prunes at on this checkpoint (its recorded ones where they fit)."""
        return tuple(self.model.prune_layers_for(method))

    def reachable_budgets(self, method: str, prune_layers=None) -> tuple[float, float]:
        """The lowest and highest budget ``method`` reaches at ``prune_layers``."""
        return self.model.reachable_budgets(method, prune_layers)

    def default_choice(self) -> tuple[str, float | None]:
        """``(method, budget)`` of ``default_setting`` (budget ``None``: none recorded)."""
        default = self.default_setting()
        return default.prune_method, default.vision_token_budget

    def default_budget(self) -> float:
        """The compressed pane's budget when nothing else says: a third of the vision tokens."""
        return max(1, round(self.num_patches / 3))

    def picture(self, image: Image.Image, trace: PruningTrace | None) -> Image.Image:
        """What ``trace`` kept of ``image`` (``None``: the whole image)."""
        from .picture import kept_patches_picture

        return kept_patches_picture(image, trace, self.model.get_vision_tower().num_patches_per_side, self.num_layers)

    # ------------------------------------------------------------------ settings
    def setting(self, method: str | None, budget: float | None, prune_layers=None) -> PruningSetting:
        """``method`` at ``budget`` mean vision tokens (``None`` / ``"full"``: no pruning), at
        ``prune_layers`` (default: ``model.prune_layers_for(method)``, the checkpoint's where
        they fit); a ``ScheduleError`` names an unreachable budget. The config is not touched."""
        if method in (None, "full"):
            return self.model.resolve_pruning(prune_layers=[], drop_ratio=0.0)[0]
        return self.model.resolve_pruning(prune_layers=None if prune_layers is None else list(prune_layers),
                                          method=method, vision_token_budget=float(budget))[0]

    def default_setting(self) -> PruningSetting:
        """The checkpoint's recorded schedule, else ADSC at a third of the vision tokens."""
        recorded = self.model.recorded_pruning
        if recorded is not None and recorded.vision_token_budget is not None:
            return self.setting(recorded.prune_method, recorded.vision_token_budget, recorded.prune_layers)
        if recorded is not None:
            return recorded
        return self.setting("adsc", self.default_budget())

    def warm_up(self, settings) -> None:
        """One short answer per setting on a grey image, so no reply's TTFT carries the first
        call's one-off costs."""
        image = Image.new("RGB", (32, 32), (127, 127, 127))
        for setting in settings:
            self.answer(image, [], "Describe the image.", setting, max_new_tokens=2)

    # ------------------------------------------------------------------ prompts
    def prompt(self, history: list[tuple[str, str]], question: str) -> str:
        """The checkpoint's template over earlier ``(user, assistant)`` turns and the new
        question; the image goes with the first user turn."""
        image = DEFAULT_IMAGE_TOKEN
        if self.model.config.mm_use_im_start_end:
            image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        conv = get_conv_template(self.conv_mode)
        turns = [*history, (question, None)]
        for index, (user, assistant) in enumerate(turns):
            conv.append_message(conv.roles[0], (image + "\n" + user) if index == 0 else user)
            conv.append_message(conv.roles[1], assistant)
        return conv.get_prompt()

    def encode(self, image: Image.Image, history, question: str, max_new_tokens: int):
        """``(input_ids (1, L), pixels, max_new_tokens)``, the last cut to the room the context
        leaves (logged); ``InputError`` if the conversation fills the context by itself."""
        if not question or not question.strip():
            raise InputError("empty question: type one")
        ids = tokenizer_image_token(self.prompt(history, question.strip()), self.tokenizer, return_tensors="pt")[None]
        length = prompt_length_with_images(ids, None, self.num_patches)
        fix = "start a new chat" + (" or ask a shorter question" if not history else "")
        max_new_tokens = fit_new_tokens(length, max_new_tokens, self.context_length, fix)
        pixels = process_images([image], self.image_processor, self.model.config)
        return ids.to(self.model.device), pixels.to(self.model.device, self.model.dtype), max_new_tokens

    # ------------------------------------------------------------------ generation
    def _generate(self, encoded, pruning: PruningSetting, streamer, max_new_tokens: int, temperature: float):
        """``(generate's output, the call's trace)`` of one reply under ``pruning``."""
        ids, pixels, _ = encoded
        with torch.inference_mode(), self.model.pruned_as(pruning) as record:
            out = self.model.generate(
                ids, images=pixels, streamer=streamer, max_new_tokens=max_new_tokens,
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True)
        return out, record.trace

    def _reply_cost(self, encoded, pruning: PruningSetting, new_tokens: int):
        """``(prompt text tokens, ModelCost)`` of one reply under ``pruning`` (the cost model)."""
        prompt_tokens = int(encoded[0].shape[1]) - 1
        method = pruning.prune_method if pruning.enabled else None
        host = self.model.pruning_host()
        cost = schedule_cost(self.shape, method, resolve.schedule_of(host, pruning) if method else None,
                             Workload(prompt_tokens, 1, new_tokens, 1, torch.finfo(self.model.dtype).bits // 8),
                             pre_llm=resolve.pre_llm_plan(host, pruning), budget=pruning.vision_token_budget)
        return prompt_tokens, cost

    def _mean_vision_tokens(self, trace, encoded) -> float:
        return mean_vision_tokens(trace, self.num_layers, self.num_patches)

    def _label(self, pruning) -> tuple[str, float | None, str]:
        """``(method or "full", budget shown, label)`` of a setting."""
        method = pruning.prune_method if pruning.enabled else None
        return method or "full", pruning.vision_token_budget if method else None, setting_label(pruning)

    def stream(self, image: Image.Image, history, question: str, pruning: PruningSetting,
               max_new_tokens: int = 64, temperature: float = 0.0):
        """Yield the reply text as it grows, then a ``Reply`` (the last item)."""
        encoded = self.encode(image, history, question, max_new_tokens)
        max_new_tokens = encoded[-1]
        streamer = _TimedStreamer(self.tokenizer, timeout=600)
        result: dict = {}

        def work():
            try:
                out, trace = self._generate(encoded, pruning, streamer, max_new_tokens, temperature)
                result.update(out=out, trace=trace)
            except BaseException as error:  # handed to the caller's thread below
                result["error"] = error
                streamer.end()

        start = time.perf_counter()
        worker = threading.Thread(target=work, name="llava-chat-generate", daemon=True)
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        worker.join()
        if "error" in result:
            raise result["error"]
        out = result["out"]
        sequences = out.sequences[:, self._prompt_length(encoded):]
        new_tokens = int(sequences.shape[1])
        times = streamer.token_times
        ttft = 1000 * ((times[0] if times else time.perf_counter()) - start)
        speed = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
        text = self.tokenizer.decode(sequences[0], skip_special_tokens=True).strip()
        prompt_tokens, cost = self._reply_cost(encoded, pruning, new_tokens)
        trace, cache = result["trace"], compat.output_cache(out)
        method, budget, label = self._label(pruning)
        metrics = ReplyMetrics(
            method=method, budget=budget, ttft_ms=ttft,
            tokens_per_s=speed, new_tokens=new_tokens,
            mean_vision_tokens=self._mean_vision_tokens(trace, encoded),
            kv_mb=cache_nbytes(cache) / 1e6, tflops=cost.flops_total / 1e12, prompt_tokens=prompt_tokens,
            # the last answer token is never fed back, so the cache holds new_tokens - 1 of them
            prefill_kv_mb=cache_nbytes(cache, without_last=max(new_tokens - 1, 0)) / 1e6,
            prefill_gflops=(cost.flops_total - cost.decode_flops) / 1e9, answer_gflops=cost.decode_flops / 1e9,
            label=label)
        logger.info("reply %s; %s", metrics.prefill_line(), metrics.answer_line())
        yield Reply(text=text, metrics=metrics, trace=trace, history=[*history, (question.strip(), text)])

    def _prompt_length(self, encoded) -> int:
        """Where the answer starts in ``generate``'s sequences (ours return only the new tokens)."""
        return 0

    def trace(self, image: Image.Image, history, question: str, pruning: PruningSetting) -> PruningTrace | None:
        """The ``PruningTrace`` of one prefill of this turn under ``pruning`` (no answer)."""
        ids, pixels, _ = self.encode(image, history, question, 1)
        with torch.inference_mode(), self.model.pruned_as(pruning) as record:
            self.model(input_ids=ids, images=pixels, use_cache=True, logits_to_keep=1)
        return record.trace

    def answer(self, image, history, question, pruning, **kwargs) -> Reply:
        """``stream`` to its end."""
        last = None
        for last in self.stream(image, history, question, pruning, **kwargs):
            pass
        return last
