"""The benchmark inference loop shared by ``model_vqa_loader`` and ``model_vqa_science``.

* Upstream's flags and answer-file format (``question_id``, ``prompt``, ``text``,
  ``answer_id``, ``model_id``, ``metadata``), batched generation (left padding), any
  pruning setting, a progress bar.
* Resume: rerunning with the same answers file appends only the questions not answered
  yet (a question is known by its ``question_id`` and prompt, since MME repeats ids).
  Answers are appended a batch at a time and flushed to disk; a line cut short by a crash is
  dropped (and the file rewritten atomically) by the next run.
* Each answers file gets ``<answers>.settings.json`` beside it: model, a fingerprint of its
  weights, generation parameters, pruning schedule and average vision tokens. A rerun with
  other settings, or with other weights under the same path (a model retrained into its
  folder), is refused instead of mixing answers of two models in one file; ``--overwrite``
  starts the file afresh.
* Every question is checked before the model is loaded: its image exists and opens, and
  its text does not carry an ``<image>`` marker of its own (the loader places the image's).
  A problem names the question id and follows ``--on-bad-question``: ``error`` (default,
  nothing is generated), ``record`` (an answer line with ``text`` ``""`` and the problem in
  ``metadata.error``) or ``skip`` (no line). An image that passes the check but fails to
  decode in the loop follows the same policy. An empty question file or chunk is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from adsc_patch.methods import DEFAULT_METHOD

from ..constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from ..conversation import get_conv_template
from ..cli import InputError, add_debug_arg
from ..mm_utils import (ImageLoadError, check_image, context_length, fit_new_tokens, get_model_name_from_path,
                        load_image, process_images, prompt_length_with_images, tokenizer_image_token)
from ..model.builder import check_attention_implementation, load_pretrained_model, resolve_checkpoint
from ..model.fingerprint import weights_fingerprint
from ..model.vlm import (LoadedVlm, chat_messages, encode_prompts, generate_replies, is_transformers_vlm,
                         load_transformers_vlm, mean_vision_tokens_per_row)
from .io import EvalInputError, write_json_atomic
from .pruning_args import add_pruning_args, apply_pruning_args, vlm_spec_from_args

logger = logging.getLogger(__name__)

__all__ = ["BatchAnswers", "answer_batch", "encode_question", "EvalQuestion", "AnswerFile", "BAD_QUESTION_POLICIES", "add_inference_args", "add_model_args", "load_model_from_args",
           "generation_kwargs", "prompt_batch", "get_chunk", "question_problems", "run_inference", "main_with_questions"]

BAD_QUESTION_POLICIES = ("error", "record", "skip")


def generation_kwargs(args: argparse.Namespace, pad_token_id: int | None) -> dict:
    """``model.generate`` arguments from upstream's sampling flags (``--temperature 0``: greedy)."""
    return dict(
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else None,
        top_p=args.top_p,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


@dataclass
class EvalQuestion:
    """One benchmark question.

    ``question_id`` and ``prompt`` go to the answer file as upstream writes them; ``query``
    is the user turn without the image marker; ``image`` is a path relative to the image
    folder, or ``None`` for text-only questions.
    """

    question_id: object
    prompt: str
    query: str
    image: str | None
    metadata: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return json.dumps([self.question_id, self.prompt])


def get_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """Contiguous chunk ``chunk_idx`` of ``num_chunks``, each ``ceil(n / num_chunks)`` long."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} is not in [0, --num-chunks {num_chunks})")
    size = math.ceil(len(items) / num_chunks)
    return items[chunk_idx * size : (chunk_idx + 1) * size]


def _chunk_of(questions: list[EvalQuestion], args) -> list[EvalQuestion]:
    if not questions:
        raise EvalInputError(f"{args.question_file} holds no questions")
    chunk = get_chunk(questions, args.num_chunks, args.chunk_idx)
    if not chunk:
        raise EvalInputError(
            f"chunk {args.chunk_idx} of {args.num_chunks} is empty: {args.question_file} has only "
            f"{len(questions)} questions (use --num-chunks {len(questions)} or fewer)"
        )
    return chunk


_FINGERPRINTED = {"model": "model_path", "base": "model_base"}


class AnswerFile:
    """An answers file that can be resumed and never holds a broken line."""

    def __init__(self, path: str, overwrite: bool = False):
        self.path = path
        self.settings_path = path + ".settings.json"
        self.done: set[str] = set()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if overwrite:
            for stale in (path, self.settings_path):
                if os.path.exists(stale):
                    logger.info("--overwrite: starting %s afresh", stale)
                    os.remove(stale)
        if os.path.exists(path):
            self._load_and_repair()

    def _load_and_repair(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        good, broken = [], 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines) - 1:
                    raise EvalInputError(f"{self.path}:{number} is corrupt (not the last line): fix or remove the file")
                broken += 1
                continue
            good.append(line)
            self.done.add(json.dumps([record["question_id"], record["prompt"]]))
        if broken:
            logger.warning("%s: dropping a line cut short by an interrupted run", self.path)
            tmp = self.path + ".repair"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in good))
            os.replace(tmp, self.path)

    def check_settings(self, settings: dict) -> None:
        """Refuse to mix answers produced under different settings in one file."""
        if not self.done or not os.path.exists(self.settings_path):
            return
        with open(self.settings_path, encoding="utf-8") as f:
            previous = json.load(f)
        keys = ("model_path", "model_base", "vision_tower", "conv_mode", "generation", "question_file", "quantization")
        changed = [k for k in keys if previous.get(k, settings.get(k)) != settings.get(k)]
        if "pruning" in previous and _pruning_differs(previous["pruning"], settings["pruning"]):
            changed.append("pruning")
        if changed:
            raise EvalInputError(
                f"{self.path} already holds {len(self.done)} answers made with other settings ({', '.join(changed)} "
                "differ); pass --overwrite to start it afresh, or use another --answers-file"
            )
        before, now = previous.get("weights_fingerprint"), settings.get("weights_fingerprint")
        if before is not None and before != now:
            changed = [k for k in now if before.get(k) != now.get(k)]
            raise EvalInputError(
                f"{self.path} already holds {len(self.done)} answers of other weights: the {' and '.join(changed)} "
                f"at {', '.join(str(settings.get(_FINGERPRINTED[k])) for k in changed)} changed since they were written "
                "(retrained?); pass --overwrite to start it afresh, or use another --answers-file"
            )

    def append(self, records: list[dict]) -> None:
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.done.add(json.dumps([r["question_id"], r["prompt"]]))


class _QuestionDataset(Dataset):
    def __init__(self, questions, tokenizer, image_processor, model_config, image_folder, conv_mode):
        self.questions = questions
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config
        self.image_folder = image_folder
        self.conv_mode = conv_mode

    def __len__(self):
        return len(self.questions)

    def __getitem__(self, index):
        question = self.questions[index]
        image = None
        if question.image is not None:
            try:
                image = load_image(os.path.join(self.image_folder, question.image))
            except ImageLoadError as error:
                return index, None, str(error)  # an image that passed the check but does not decode
        ids, pixels = encode_question(question.query, image, self.tokenizer, self.image_processor, self.model_config,
                                      self.conv_mode)
        return index, ids, pixels


def encode_question(query: str, image, tokenizer, image_processor, model_config, conv_mode: str):
    """``(input_ids (L,), pixels (3, H, W) or None)`` of one benchmark question as the loaders
    prompt LLaVA-1.5: the image's marker first, then the question, in ``conv_mode``'s template."""
    pixels = None
    if image is not None:
        image_token = DEFAULT_IMAGE_TOKEN
        if getattr(model_config, "mm_use_im_start_end", False):
            image_token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        query = f"{image_token}\n{query}"
        pixels = process_images([image], image_processor, model_config)[0]
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt"), pixels


def _collate_left(pad_token_id):
    """Left-padded batch; items whose image failed to decode come back as ``failed``
    ``(index, message)`` pairs (``_QuestionDataset`` returns ``ids=None`` for them)."""

    def collate(items):
        failed = [(i, message) for i, ids, message in items if ids is None]
        items = [item for item in items if item[1] is not None]
        if not items:
            return [], None, None, None, failed
        indices = [i for i, _, _ in items]
        length = max(len(ids) for _, ids, _ in items)
        input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(items), length, dtype=torch.long)
        for row, (_, ids, _) in enumerate(items):
            input_ids[row, length - len(ids):] = ids
            mask[row, length - len(ids):] = 1
        pixels = [p for _, _, p in items if p is not None]
        return indices, input_ids, mask, torch.stack(pixels) if pixels else None, failed

    return collate


def prompt_batch(questions: list[EvalQuestion], tokenizer, image_processor, model_config, image_folder: str,
                 conv_mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask, pixel_values)`` of ``questions`` exactly as ``run_inference``
    feeds them to the model: chat prompts, left padding, one image each."""
    dataset = _QuestionDataset(questions, tokenizer, image_processor, model_config, image_folder, conv_mode)
    _, input_ids, mask, pixels, failed = _collate_left(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    if failed:
        raise EvalInputError(f"question {questions[failed[0][0]].question_id!r}: {failed[0][1]}")
    return input_ids, mask, pixels


def add_model_args(parser: argparse.ArgumentParser, model_path_help: str | None = None) -> None:
    """The flags that choose and load the model (every inference entry point); with
    ``model_path_help`` (which says the default) ``--model-path`` is optional."""
    parser.add_argument("--model-path", required=model_path_help is None, default=None,
                        help=model_path_help or "checkpoint folder or hub id (offline: from the HF cache)")
    parser.add_argument("--model-base", default=None, help="base of a LoRA or projector-only checkpoint")
    parser.add_argument("--vision-tower", default=None, help="override the checkpoint's mm_vision_tower (folder or hub id)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--attn-implementation", default=None, choices=["eager", "sdpa", "flash_attention_2"],
                        help="the language model's attention (default: the checkpoint's, sdpa)")
    bits = parser.add_mutually_exclusive_group()
    bits.add_argument("--load-8bit", action="store_true", help="language model in 8 bit (bitsandbytes)")
    bits.add_argument("--load-4bit", action="store_true", help="language model in 4 bit, nf4 (bitsandbytes)")


def load_model_from_args(args: argparse.Namespace):
    """``load_pretrained_model`` with the flags of ``add_model_args``."""
    check_attention_implementation(args.attn_implementation, "--attn-implementation",
                                   cuda=None if args.device is None else str(args.device).startswith("cuda"))
    return load_pretrained_model(
        args.model_path, args.model_base, device=args.device, attn_implementation=args.attn_implementation,
        vision_tower=args.vision_tower, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
    )


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--overwrite", action="store_true",
                        help="start the answers file afresh instead of resuming it")
    parser.add_argument("--conv-mode", default=None, help="default: the checkpoint's conv_mode, else vicuna_v1")
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (left-padded)")
    parser.add_argument("--num-workers", type=int, default=2, help="image-loading workers")
    parser.add_argument("--on-bad-question", "--on-missing-image", dest="on_bad_question",
                        choices=BAD_QUESTION_POLICIES, default="error",
                        help="a missing or unreadable image, or an <image> marker in the text: error (stop before "
                             "generating), record (answer '' with the problem in metadata.error) or skip")
    add_pruning_args(parser)
    add_debug_arg(parser)


def _pruning_differs(before: dict, now: dict) -> bool:
    """Compared on what the earlier file recorded (later releases add derived fields), and on
    the method, which files of ADSC runs leave out."""
    def get(pruning: dict, key: str):
        return pruning.get(key, DEFAULT_METHOD if key == "method" else None)

    return any(get(before, key) != get(now, key) for key in set(before) | {"method"})


def _settings(args, model, model_name, conv_mode, schedule, n_questions) -> dict:
    import transformers

    pruning = {
        "prune_layers": list(model.config.prune_layers),
        "drop_ratio": model.config.drop_ratio,
        "vision_token_budget": model.config.vision_token_budget,
        "selection": model.config.prune_selection,
    }
    if model.config.prune_method != DEFAULT_METHOD:  # absent for adsc: earlier releases' answer files resume
        pruning["method"] = model.config.prune_method
    if schedule is not None:
        pruning.update(
            vision_tokens_per_stage=list(schedule.stage_tokens),
            average_vision_tokens=schedule.average_tokens,
            vision_tokens_after_last_stage=schedule.stage_tokens[-1],
            vision_tokens_per_layer=list(schedule.tokens_per_layer),
        )
    return {
        "model_path": args.model_path,
        "model_base": args.model_base,
        "vision_tower": args.vision_tower,
        "quantization": "8bit" if args.load_8bit else "4bit" if args.load_4bit else None,
        "model_id": model_name,
        "question_file": os.path.abspath(args.question_file),
        "chunk": [args.chunk_idx, args.num_chunks],
        "questions_in_chunk": n_questions,
        "conv_mode": conv_mode,
        "generation": {
            "temperature": args.temperature, "top_p": args.top_p, "num_beams": args.num_beams,
            "max_new_tokens": args.max_new_tokens,
        },
        "pruning": pruning,
        "batch_size": args.batch_size,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "attn_implementation": model.config._attn_implementation,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def question_problems(questions: list[EvalQuestion], image_folder: str) -> list[tuple[EvalQuestion, str]]:
    """``(question, problem)`` for every question that cannot be answered as it stands: a
    missing or unreadable image, or an ``<image>`` marker in its text (the loader adds the
    image's marker itself, so one in the text would ask for a second image)."""
    problems = []
    for question in tqdm(questions, desc="checking questions", unit="q", disable=len(questions) < 1000):
        markers = question.query.count(DEFAULT_IMAGE_TOKEN)
        if markers:
            images = 1 if question.image is not None else 0
            problems.append((question, f"its text has {markers} {DEFAULT_IMAGE_TOKEN} marker(s) and the question "
                                       f"{images} image: remove the marker from the text (the loader places the image)"))
            continue
        if question.image is not None:
            try:
                check_image(os.path.join(image_folder, question.image))
            except ImageLoadError as error:
                problems.append((question, str(error)))
    return problems


def run_inference(args: argparse.Namespace, questions: list[EvalQuestion]) -> str:
    """Answer ``questions`` (this chunk's share) into ``args.answers_file``; returns its path."""
    questions = _chunk_of(questions, args)
    answers = AnswerFile(args.answers_file, overwrite=getattr(args, "overwrite", False))
    pending = [q for q in questions if q.key not in answers.done]
    policy = getattr(args, "on_bad_question", "error")
    problems = question_problems(pending, args.image_folder)
    if problems and policy == "error":
        shown = "; ".join(f"question {q.question_id!r}: {problem}" for q, problem in problems[:5])
        raise EvalInputError(
            f"{len(problems)} question(s) cannot be answered, e.g. {shown} (check --image-folder, or pass "
            "--on-bad-question record|skip)"
        )
    # Before the model: the fingerprint and settings checks need only the folders.
    fingerprint = {"model": weights_fingerprint(resolve_checkpoint(args.model_path, "model path"))}
    if args.model_base:
        fingerprint["base"] = weights_fingerprint(resolve_checkpoint(args.model_base, "model base"))

    if is_transformers_vlm(args.model_path, args.model_base):
        return _run_vlm_inference(args, questions, answers, pending, problems, policy, fingerprint)
    tokenizer, model, image_processor, _ = load_model_from_args(args)
    schedule = apply_pruning_args(model, args)
    model_name = get_model_name_from_path(args.model_path)
    conv_mode = args.conv_mode or model.config.conv_mode or "vicuna_v1"
    settings = _settings(args, model, model_name, conv_mode, schedule, len(questions))
    runnable = _start_answers(answers, settings, fingerprint, questions, pending, problems, policy, model_name)
    dataset = _QuestionDataset(runnable, tokenizer, image_processor, model.config, args.image_folder, conv_mode)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
        collate_fn=_collate_left(tokenizer.pad_token_id),
    )
    generation = generation_kwargs(args, tokenizer.pad_token_id)
    context = context_length(model.config)
    with tqdm(total=len(runnable), desc=os.path.basename(args.answers_file), unit="q") as progress:
        for indices, input_ids, mask, pixels, failed in loader:
            _handle_bad_questions(answers, [(runnable[i], message) for i, message in failed], policy, model_name)
            progress.update(len(failed))
            if not indices:
                continue
            texts = answer_batch(model, tokenizer, input_ids, mask, pixels, generation, context).texts
            answers.append([_record(runnable[i], t, model_name) for i, t in zip(indices, texts)])
            progress.update(len(indices))

    settings["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    settings["answered"] = len([q for q in questions if q.key in answers.done])
    write_json_atomic(answers.settings_path, settings)
    return args.answers_file


@dataclass
class BatchAnswers:
    """``answer_batch``'s result: the texts, the call's trace (``None`` unpruned) and
    ``generate``'s output (its cache: ``compat.output_cache``)."""

    texts: list[str]
    trace: object
    output: object


def answer_batch(model, tokenizer, input_ids, mask, pixels, generation: dict, context: int) -> BatchAnswers:
    """Greedy (or sampled, per ``generation``) answers of a left-padded batch on our LLaVA-1.5
    model, ``max_new_tokens`` cut to the room the context leaves."""
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
    if pixels is not None:
        pixels = pixels.to(model.device, dtype=model.dtype)
    length = prompt_length_with_images(input_ids, mask, model.get_vision_tower().num_patches)
    fitted = fit_new_tokens(length, generation["max_new_tokens"], context, "the question is too long for this model")
    with torch.inference_mode(), model.pruned_as(None) as record:
        output = model.generate(input_ids, images=pixels, attention_mask=mask, return_dict_in_generate=True,
                                **dict(generation, max_new_tokens=fitted))
    texts = [text.strip() for text in tokenizer.batch_decode(output.sequences, skip_special_tokens=True)]
    return BatchAnswers(texts, record.trace, output)


def load_vlm_from_args(args: argparse.Namespace) -> LoadedVlm:
    """``load_transformers_vlm`` with the flags of ``add_model_args``; the flags that only mean
    something for LLaVA-1.5 (``--vision-tower``, ``--conv-mode``) are refused in one line."""
    if getattr(args, "vision_tower", None):
        raise InputError("--vision-tower: this checkpoint (a transformers VLM) brings its own vision tower")
    if getattr(args, "conv_mode", None):
        raise InputError("--conv-mode: this checkpoint (a transformers VLM) is prompted with its own chat template")
    check_attention_implementation(args.attn_implementation, "--attn-implementation",
                                   cuda=None if args.device is None else str(args.device).startswith("cuda"))
    return load_transformers_vlm(args.model_path, args.model_base, device=args.device,
                                 attn_implementation=args.attn_implementation, load_8bit=args.load_8bit,
                                 load_4bit=args.load_4bit)


def _vlm_settings(args, loaded: LoadedVlm, model_name: str, spec, n_questions: int) -> dict:
    import transformers

    model = loaded.model
    return {
        "model_path": args.model_path,
        "model_base": args.model_base,
        "vision_tower": None,
        "quantization": "8bit" if args.load_8bit else "4bit" if args.load_4bit else None,
        "model_id": model_name,
        "model_type": model.config.model_type,
        "question_file": os.path.abspath(args.question_file),
        "chunk": [args.chunk_idx, args.num_chunks],
        "questions_in_chunk": n_questions,
        "conv_mode": f"chat template of {model.config.model_type}",
        "generation": {
            "temperature": args.temperature, "top_p": args.top_p, "num_beams": args.num_beams,
            "max_new_tokens": args.max_new_tokens,
        },
        "pruning": spec.to_dict(),
        "batch_size": args.batch_size,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "attn_implementation": model.config._attn_implementation,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _run_vlm_inference(args, questions, answers: AnswerFile, pending, problems, policy: str, fingerprint: dict) -> str:
    """``run_inference`` for a transformers VLM: prompts by its chat template and processor, the
    pruning spec per call; the same answer file, resume, settings and bad-question rules."""
    loaded = load_vlm_from_args(args)
    spec = vlm_spec_from_args(loaded, args)
    model_name = get_model_name_from_path(args.model_path)
    settings = _vlm_settings(args, loaded, model_name, spec, len(questions))
    runnable = _start_answers(answers, settings, fingerprint, questions, pending, problems, policy, model_name)
    generation = generation_kwargs(args, loaded.tokenizer.pad_token_id)
    with tqdm(total=len(runnable), desc=os.path.basename(args.answers_file), unit="q") as progress:
        for first in range(0, len(runnable), args.batch_size):
            batch, conversations, images, failed = [], [], [], []
            for question in runnable[first:first + args.batch_size]:
                try:
                    image = [] if question.image is None else [load_image(os.path.join(args.image_folder, question.image))]
                except ImageLoadError as error:
                    failed.append((question, str(error)))
                    continue
                batch.append(question)
                conversations.append(chat_messages([(question.query, None)], [len(image)]))
                images.append(image)
            _handle_bad_questions(answers, failed, policy, model_name)
            progress.update(len(failed))
            if not batch:
                continue
            inputs = encode_prompts(loaded, conversations, images)
            fitted = fit_new_tokens(int(inputs["input_ids"].shape[1]), args.max_new_tokens, loaded.context_length,
                                    "the question is too long for this model")
            reply = generate_replies(loaded, inputs, spec, **dict(generation, max_new_tokens=fitted))
            means = mean_vision_tokens_per_row(inputs, loaded.model.config.image_token_id, reply.trace)
            answers.append([_record(q, text, model_name, {"mean_vision_tokens": round(mean, 3)})
                            for q, text, mean in zip(batch, reply.texts, means)])
            progress.update(len(batch))

    settings["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    settings["answered"] = len([q for q in questions if q.key in answers.done])
    write_json_atomic(answers.settings_path, settings)
    return args.answers_file


def _start_answers(answers: AnswerFile, settings: dict, fingerprint: dict, questions, pending, problems, policy: str,
                   model_name: str) -> list[EvalQuestion]:
    """Check ``settings`` against the answers file's, record them (started now), apply
    ``--on-bad-question`` to ``problems``; returns the questions left to answer."""
    settings["weights_fingerprint"] = fingerprint
    answers.check_settings(settings)
    settings["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json_atomic(answers.settings_path, settings)
    if len(pending) < len(questions):
        logger.info("resuming: %d of %d questions already answered", len(questions) - len(pending), len(questions))
    bad_keys = {q.key for q, _ in problems}
    _handle_bad_questions(answers, problems, policy, model_name)
    return [q for q in pending if q.key not in bad_keys]


def _handle_bad_questions(answers: AnswerFile, problems: list[tuple[EvalQuestion, str]], policy: str,
                          model_name: str) -> None:
    """Apply ``--on-bad-question`` to questions that cannot be answered."""
    if not problems:
        return
    if policy == "error":
        question, problem = problems[0]
        raise EvalInputError(f"question {question.question_id!r}: {problem} (or pass --on-bad-question record|skip)")
    for question, problem in problems:
        logger.warning("question %r: %s (%s)", question.question_id, problem,
                       "recorded as an empty answer" if policy == "record" else "skipped")
    if policy == "record":
        answers.append([_record(q, "", model_name, {"error": problem}) for q, problem in problems])


def _record(question: EvalQuestion, text: str, model_name: str, metadata: dict | None = None) -> dict:
    # Deterministic, so that a resumed run writes the same file as an uninterrupted one.
    answer_id = hashlib.sha1(f"{model_name}\n{question.key}\n{text}".encode()).hexdigest()[:22]
    return {
        "question_id": question.question_id,
        "prompt": question.prompt,
        "text": text,
        "answer_id": answer_id,
        "model_id": model_name,
        "metadata": {**question.metadata, **(metadata or {})},
    }


def main_with_questions(description: str, load_questions, extra_args=None, argv=None, prog: str | None = None) -> str:
    """Command-line entry shared by the two loaders: parse, read questions, run. ``prog``: the
    command as users type it (``python -m llava.eval.model_vqa_loader``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_inference_args(parser)
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_inference(args, load_questions(args))
