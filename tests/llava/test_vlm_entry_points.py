"""Every inference entry point on a tiny transformers Qwen2.5-VL checkpoint (``make_tiny_vlm``):
``run_llava``, the benchmark loader, the terminal chat and the demo's ``compare`` API, from the
folder and from a fake offline hub cache.

The reference answers are computed here without our prompt code: the prompt string written by
Qwen's chat format rule (a system turn, the image between the vision start and end tokens),
its image token repeated by the rule ``t * h * w / merge**2`` of the image processor's grid,
the stock model's greedy ``generate``; pruned references under ``adsc_patch.pruning`` (which
tests/adsc_patch/test_qwen_vl.py checks against an uncached loop written there)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from adsc_patch import PruningSpec, pruning, solve_drop_ratio
from adsc_patch.profile import ModelShape, Workload, model_cost
from llava.cli import InputError, UsageExit
from llava.eval import model_vqa_loader, run_llava
from llava.model.vlm import chat_messages, encode_prompts, generate_replies, is_transformers_vlm, load_transformers_vlm
from llava.serve import cli as chat_cli
from llava.serve.vlm_chat import VlmChatEngine
from tests.helpers import read_lines
from tests.llava.test_hub import cache_repo

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 5
QUESTIONS = ("What is in the image?", "Describe the grid.", "Is there a cat?")
SIZES = ((30, 40), (32, 32), (17, 25))  # (height, width): 8, 16 and 6 merged tokens


def _prompt_text(question: str) -> str:
    """Qwen's chat format, written out."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm_images")
    rng = np.random.RandomState(3)
    paths = []
    for index, (h, w) in enumerate(SIZES):
        path = folder / f"img{index}.png"
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def stock(tiny_qwen_dir):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    return model, tokenizer, Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen_dir)


def _reference(stock, question, image_path, spec=None, new=NEW, with_length=False, logits=False):
    """``(answer, vision tokens)`` of the stock model on the written prompt, greedy
    (``with_length``: and the prompt's length; ``logits``: every step's logits instead)."""
    model, tokenizer, image_processor = stock
    features = image_processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    grid = features["image_grid_thw"]
    n = int(grid.prod()) // 4
    before, after = _prompt_text(question).split("<|image_pad|>")
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = tokenizer(before)["input_ids"] + [pad] * n + tokenizer(after)["input_ids"]
    ids = torch.tensor([ids])
    block = pruning(model, spec) if spec is not None else None
    with torch.no_grad():
        if block is not None:
            block.__enter__()
        try:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=features["pixel_values"], image_grid_thw=grid,
                                 mm_token_type_ids=(ids == pad).int(), max_new_tokens=new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_logits=True)
        finally:
            if block is not None:
                block.__exit__(None, None, None)
    if logits:
        return torch.stack(out.logits, 1)[0]
    answer = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return (answer, n, ids.shape[1]) if with_length else (answer, n)


def test_the_checkpoint_is_recognised_and_prompted_with_its_own_template(tiny_qwen_dir, images):
    assert is_transformers_vlm(tiny_qwen_dir)
    loaded = load_transformers_vlm(tiny_qwen_dir, device="cpu")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    assert loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) \
        == _prompt_text(QUESTIONS[0])


@pytest.mark.parametrize("flags, spec", [
    ([], None),
    (["--budget-fraction", "0.5", "--prune-layers", "1"], PruningSpec(budget_fraction=0.5, layers=(1,))),
    (["--prune-method", "fastv", "--drop-ratio", "0.5"], PruningSpec(method="fastv", drop_ratio=0.5)),
])
def test_run_llava_answers_as_the_stock_model_on_the_written_prompt(tiny_qwen_dir, images, stock, flags, spec, capsys):
    answer = run_llava.main(["--model-path", tiny_qwen_dir, "--image-file", images[0], "--query", QUESTIONS[0],
                             "--temperature", "0", "--max_new_tokens", str(NEW), "--device", "cpu", *flags])
    expected, n = _reference(stock, QUESTIONS[0], images[0], spec)
    assert answer == expected
    printed = capsys.readouterr().out
    if spec is not None and spec.budget_fraction is not None:  # per layer: all, then the solved count
        kept = solve_drop_ratio(4, n, (1,), 0.5 * n).stage_tokens
        assert f"[image 1: vision tokens per layer {[kept[0]] + [kept[1]] * 3}]" in printed


@pytest.mark.parametrize("spec", [None, PruningSpec(budget_fraction=0.5, layers=(1,)),
                                  PruningSpec(method="fastv", budget_fraction=0.5, layers=(2,))])
def test_a_left_padded_batch_of_prompts_gives_each_prompts_own_logits(tiny_qwen_dir, images, stock, spec):
    """``encode_prompts`` + ``generate_replies`` on three images of different sizes: every step's
    logits of each row == the stock model on that prompt alone, built by the written rule."""
    loaded = load_transformers_vlm(tiny_qwen_dir, device="cpu")
    conversations = [chat_messages([(question, None)]) for question in QUESTIONS]
    inputs = encode_prompts(loaded, conversations, [[Image.open(path).convert("RGB")] for path in images])
    mask = inputs["attention_mask"]
    assert bool((mask[:, -1] == 1).all()) and not bool(mask.all())  # left padding
    reply = generate_replies(loaded, inputs, spec, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             output_logits=True)
    batch_logits = torch.stack(reply.output.logits, 1)
    for row, (question, image) in enumerate(zip(QUESTIONS, images)):
        torch.testing.assert_close(batch_logits[row], _reference(stock, question, image, spec, logits=True),
                                   atol=1e-4, rtol=1e-4)


def test_run_llava_takes_the_checkpoint_from_a_fake_offline_hub_cache(tiny_qwen_dir, images, stock, tmp_path,
                                                                       monkeypatch):
    from huggingface_hub import constants

    cache = str(tmp_path / "hub")
    cache_repo(cache, "fakeorg/tiny-qwen2.5-vl", tiny_qwen_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    answer = run_llava.main(["--model-path", "fakeorg/tiny-qwen2.5-vl", "--image-file", images[1], "--query",
                             QUESTIONS[1], "--temperature", "0", "--max_new_tokens", str(NEW), "--device", "cpu",
                             "--budget-fraction", "0.4", "--prune-layers", "1,2"])
    assert answer == _reference(stock, QUESTIONS[1], images[1], PruningSpec(budget_fraction=0.4, layers=(1, 2)))[0]


def test_run_llava_refuses_what_means_nothing_for_this_model_in_one_line(tiny_qwen_dir, images, capsys):
    common = ["--model-path", tiny_qwen_dir, "--image-file", images[0], "--query", "What?", "--device", "cpu"]
    with pytest.raises(UsageExit):
        run_llava.main([*common, "--vision-token-budget", "4"])
    assert "absolute budget" in capsys.readouterr().err
    with pytest.raises(InputError, match="--conv-mode"):
        run_llava.main([*common, "--conv-mode", "vicuna_v1"])
    with pytest.raises(InputError, match="marker"):
        run_llava.main([*common[:-3], "<image> and <image>?", "--device", "cpu"])


def test_the_benchmark_loader_answers_a_batch_as_each_question_alone_and_resumes(tiny_qwen_dir, images, stock,
                                                                                  tmp_path):
    questions = tmp_path / "questions.jsonl"
    with open(questions, "w") as f:
        for index, (question, image) in enumerate(zip(QUESTIONS, images)):
            f.write(json.dumps({"question_id": index, "image": os.path.basename(image), "text": question}) + "\n")
    answers = tmp_path / "answers.jsonl"
    argv = ["--model-path", tiny_qwen_dir, "--question-file", str(questions), "--image-folder",
            os.path.dirname(images[0]), "--answers-file", str(answers), "--temperature", "0", "--max_new_tokens",
            str(NEW), "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--budget-fraction", "0.5",
            "--prune-layers", "1"]
    model_vqa_loader.main(argv)
    records = [json.loads(line) for line in read_lines(answers)]
    spec = PruningSpec(budget_fraction=0.5, layers=(1,))
    for record, question, image in zip(records, QUESTIONS, images):
        text, n = _reference(stock, question, image, spec)
        assert record["text"] == text  # batched with left padding == alone
        kept = solve_drop_ratio(4, n, (1,), 0.5 * n).stage_tokens
        assert record["metadata"]["mean_vision_tokens"] == pytest.approx((kept[0] + 3 * kept[1]) / 4, abs=1e-3)
    settings = json.loads(open(str(answers) + ".settings.json").read())
    assert settings["pruning"] == spec.to_dict() and settings["conv_mode"] == "chat template of qwen2_5_vl"

    lines = read_lines(answers)
    with open(answers, "w") as f:  # a crash after the first answer, mid-way through the second
        f.writelines([lines[0], lines[1][:20]])
    model_vqa_loader.main(argv)
    assert read_lines(answers) == lines
    with pytest.raises(Exception, match="pruning"):
        model_vqa_loader.main([*argv[:-4], "--budget-fraction", "0.6", "--prune-layers", "1"])


def test_the_terminal_chat_streams_the_stock_models_answer_with_its_metrics(tiny_qwen_dir, images, stock):
    import io

    out = io.StringIO()
    replies = chat_cli.main(["--model-path", tiny_qwen_dir, "--image-file", images[0], "--temperature", "0",
                             "--max-new-tokens", str(NEW), "--device", "cpu", "--budget-fraction", "0.5",
                             "--prune-layers", "1"], stdin=io.StringIO(QUESTIONS[0] + "\n\n"), stdout=out)
    expected, n = _reference(stock, QUESTIONS[0], images[0], PruningSpec(budget_fraction=0.5, layers=(1,)))
    assert replies[0].text == expected
    kept = solve_drop_ratio(4, n, (1,), 0.5 * n).stage_tokens
    assert replies[0].metrics.mean_vision_tokens == pytest.approx((kept[0] + 3 * kept[1]) / 4)
    assert "vision tokens/layer" in out.getvalue()


@pytest.fixture(scope="module")
def served(tiny_qwen_dir):
    pytest.importorskip("gradio", reason="the demo's tests need the demo extra (pip install -e '.[dev]')")
    from tests.llava.test_gradio_demo import _free_port

    from llava.serve.gradio_demo import build_demo

    engine = VlmChatEngine(load_transformers_vlm(tiny_qwen_dir, device="cpu"))
    demo = build_demo(engine, "adsc", 0.5, max_new_tokens=NEW, prune_layers=[1], warm_up=False)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", engine
    demo.close()


def test_the_demos_compare_api_answers_both_sides_as_the_stock_model(served, images, stock):
    from gradio_client import Client, handle_file

    url, engine = served
    client = Client(url, verbose=False)
    full, compressed, metrics = client.predict(handle_file(images[2]), QUESTIONS[2], "adsc", 0.5, api_name="/compare")
    assert full == _reference(stock, QUESTIONS[2], images[2])[0]
    layers = engine.prune_layers_for("adsc")
    expected, n, length = _reference(stock, QUESTIONS[2], images[2], PruningSpec(budget_fraction=0.5, layers=layers),
                                     with_length=True)
    assert compressed == expected
    assert metrics["full"]["mean_vision_tokens"] == n
    kept = solve_drop_ratio(4, n, layers, 0.5 * n).average_tokens
    assert metrics["compressed"]["mean_vision_tokens"] == pytest.approx(kept)
    # FLOPs: the profiler's model_cost for this image's size, text and answer (not the engine's path)
    shape = ModelShape.from_config(stock[0].config, preprocessor=stock[2].to_dict())
    width, height = Image.open(images[2]).size
    for pane, method, fraction in (("full", None, None), ("compressed", "adsc", 0.5)):
        workload = Workload(length - n, 1, metrics[pane]["new_tokens"], 1, 4, width, height)
        cost = model_cost(shape, method, None, workload, layers if method else None, budget_fraction=fraction)
        assert metrics[pane]["tflops"] == pytest.approx(cost.flops_total / 1e12)
        assert metrics[pane]["prompt_tokens"] == length - n
    with pytest.raises(Exception, match="fraction"):
        client.predict(handle_file(images[2]), QUESTIONS[2], "adsc", 12, api_name="/compare")


def test_a_hub_id_that_is_not_cached_is_named_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="fakeorg/absent"):
        is_transformers_vlm("fakeorg/absent")
    shutil.rmtree(tmp_path / "empty", ignore_errors=True)
