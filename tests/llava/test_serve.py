"""The chat engine the demo and the terminal chat share (``llava.serve.chat``), and
``python -m llava.serve.cli`` with piped input, on a tiny checkpoint.

References are independent of the engine's path (a per-call setting, a cache, a streamer):
replies are checked against greedy decoding by uncached full forwards with the setting
stored on the config; KV bytes against the profiler's prediction; the kept-patch masks
against the schedule's counts.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from adsc_patch import ScheduleError, compat
from adsc_patch.cache import cache_nbytes
from adsc_patch.profile import ModelShape, Workload, model_cost
from llava.cli import InputError, run_command
from llava.constants import IGNORE_INDEX
from llava.mm_utils import ImageLoadError, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.pruning_setting import PruningSetting
from llava.serve.chat import ChatEngine, mean_vision_tokens, open_image
from llava.serve.picture import kept_patch_masks, kept_patches_picture

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 5
# tiny_deep: 8 decoder layers, 36 vision tokens (6 x 6)
SETTINGS = {"full": (None, None), "adsc": ("adsc", 12.0), "fastv": ("fastv", 12.0), "pdrop": ("pdrop", 16.0),
            "tome": ("tome", 20.0), "pool": ("pool", 9.0)}


@pytest.fixture(scope="module")
def engine(tiny_deep_dir):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    return ChatEngine(tokenizer, model, processor)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "grid.png"
    Image.fromarray((np.random.RandomState(3).rand(40, 56, 3) * 255).astype("uint8")).save(path)
    return str(path)


def _uncached_greedy(engine, image, history, question, setting, steps):
    """Greedy decoding by full forwards without a cache, the setting stored on the config. The
    tokens generated so far are passed as labels, so the score-based methods rank with the
    token before them, the last prompt token, as a cached generation ranks once at prefill."""
    model, tokenizer = engine.model, engine.tokenizer
    saved = PruningSetting.of_config(model.config)
    setting.store(model.config)
    try:
        ids = tokenizer_image_token(engine.prompt(history, question), tokenizer, return_tensors="pt")[None]
        pixels = process_images([image], engine.image_processor, model.config)
        generated = []
        with torch.no_grad():
            for _ in range(steps):
                seq = torch.cat([ids, torch.tensor([generated], dtype=torch.long)], 1) if generated else ids
                labels = torch.full_like(seq, IGNORE_INDEX)
                labels[0, ids.shape[1]:] = seq[0, ids.shape[1]:]
                logits = model(input_ids=seq, images=pixels, labels=labels if generated else None,
                               use_cache=False).logits[0, -1]
                generated.append(int(logits.argmax()))
                if generated[-1] == tokenizer.eos_token_id:
                    break
        return tokenizer.decode(generated, skip_special_tokens=True).strip()
    finally:
        saved.store(model.config)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_reply_equals_uncached_greedy_decoding_and_metrics_match_the_profile(engine, image_path, name):
    image = open_image(image_path)
    setting = engine.setting(*SETTINGS[name])
    before = PruningSetting.of_config(engine.model.config)
    pieces = list(engine.stream(image, [], "What is in the grid?", setting, max_new_tokens=NEW))
    reply = pieces[-1]
    assert reply.text == _uncached_greedy(engine, image, [], "What is in the grid?", setting, NEW)
    assert all(isinstance(p, str) for p in pieces[:-1]) and pieces[-2].strip() == reply.text
    assert PruningSetting.of_config(engine.model.config) == before  # the call did not touch the config
    m = reply.metrics
    method, budget = SETTINGS[name]
    cost = model_cost(ModelShape.from_config(engine.model.config, engine.model.get_vision_tower().config), method,
                      budget, Workload(m.prompt_tokens, 1, m.new_tokens, 1, 4))
    assert m.kv_mb * 1e6 == cost.kv_peak_bytes  # read off the call's cache = the profile's count
    assert m.mean_vision_tokens == pytest.approx(cost.mean_vision_tokens)
    assert m.tflops * 1e12 == pytest.approx(cost.flops_total)
    # the prompt's prefill apart from the answer: the cache of a prefill alone, run here
    ids, pixels, _ = engine.encode(image, [], "What is in the grid?", 1)
    with torch.no_grad(), engine.model.pruned_as(setting):
        prefill_cache = compat.output_cache(engine.model(input_ids=ids, images=pixels, use_cache=True))
    assert m.prefill_kv_mb * 1e6 == cache_nbytes(prefill_cache) == cost.kv_bytes_after_prefill
    assert m.answer_gflops * 1e9 == pytest.approx(cost.decode_flops)
    assert (m.prefill_gflops + m.answer_gflops) * 1e9 == pytest.approx(cost.flops_total)
    assert m.ttft_ms > 0 and m.new_tokens == NEW and m.method == (method or "full")
    assert (reply.trace is None) == (name == "full")


def test_concurrent_calls_with_different_budgets_each_keep_their_own_schedule(engine, image_path):
    """Two threads on one model, each asking repeatedly with its own setting: every reply's
    trace has its own schedule's per-stage counts (a shared config would mix them)."""
    image = open_image(image_path)
    settings = {12.0: engine.setting("adsc", 12.0), 24.0: engine.setting("adsc", 24.0)}
    expected = {b: engine.model.solve_schedule(b, list(s.prune_layers)).stage_tokens for b, s in settings.items()}
    seen, errors = {12.0: [], 24.0: []}, []

    def ask(budget):
        try:
            for _ in range(3):
                reply = engine.answer(image, [], "Read the grid.", settings[budget], max_new_tokens=3)
                seen[budget].append(([len(stage[0]) for stage in reply.trace.kept_vision_positions],
                                     reply.metrics.mean_vision_tokens))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(b,)) for b in settings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for budget, replies in seen.items():
        assert len(replies) == 3
        for counts, mean in replies:
            assert tuple(counts) == tuple(expected[budget]) and abs(mean - budget) <= 1
    assert engine.model.config.prune_layers == [] and engine.model.config.drop_ratio == 0


def test_multi_turn_prompt_has_the_image_once_and_the_earlier_answer(engine, image_path):
    first = engine.answer(open_image(image_path), [], "Count the digits.", engine.setting(None, None), max_new_tokens=3)
    prompt = engine.prompt(first.history, "And the first one?")
    assert prompt.count("<image>") == 1 and prompt.index("<image>") < prompt.index("Count the digits.")
    assert f"ASSISTANT: {first.text}" in prompt and prompt.endswith("USER: And the first one? ASSISTANT:")
    second = engine.answer(open_image(image_path), first.history, "And the first one?", engine.setting("adsc", 12.0),
                           max_new_tokens=3)
    assert second.text == _uncached_greedy(engine, open_image(image_path), first.history, "And the first one?",
                                           engine.setting("adsc", 12.0), 3)


def test_bad_inputs_are_refused_with_one_line_before_the_model_runs(engine, image_path, tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(InputError, match="no image"):
        open_image(None)
    with pytest.raises(ImageLoadError, match=r"not a readable image: notes.png") as info:
        open_image(str(text_file))
    assert str(tmp_path) not in str(info.value)  # the server's folders stay out of the message
    with pytest.raises(InputError, match=r"40 x 56 pixels|56 x 40 pixels is over the limit of 1,000 pixels"):
        open_image(image_path, max_pixels=1000)
    image = open_image(image_path)
    with pytest.raises(InputError, match="empty question"):
        engine.encode(image, [], "  ", 8)
    with pytest.raises(InputError, match="fills the context length of"):
        engine.encode(image, [], "word " * engine.context_length, 8)
    with pytest.raises(ScheduleError, match="reachable averages"):
        engine.setting("pdrop", 2.0)


def test_kept_patch_picture_is_read_off_the_trace_and_changes_with_the_budget(engine, image_path):
    image = open_image(image_path)
    side, layers = 6, engine.model.config.num_hidden_layers
    pictures = {}
    for budget in (12.0, 24.0):
        setting = engine.setting("adsc", budget)
        trace = engine.trace(image, [], "Read the grid.", setting)
        masks = kept_patch_masks(trace, side * side)
        counts = engine.model.solve_schedule(budget, list(setting.prune_layers)).stage_tokens
        assert [int(m.sum()) for m in masks] == list(counts)
        start = int(trace.kept_vision_positions[0][0].min())
        for mask, stage in zip(masks, trace.kept_vision_positions):
            assert set(np.flatnonzero(mask)) == {int(p) - start for p in stage[0]}
        assert mean_vision_tokens(trace, layers, side * side) == pytest.approx(budget, abs=1)
        pictures[budget] = np.asarray(kept_patches_picture(image, trace, side, layers))
        assert pictures[budget].shape[1] > 224 * len(masks)  # one panel per stage
    assert pictures[12.0].shape != pictures[24.0].shape or (pictures[12.0] != pictures[24.0]).any()
    tome = engine.trace(image, [], "Read the grid.", engine.setting("tome", 20.0))
    assert tome.merge_groups is not None and int(tome.merge_groups[0].max()) + 1 == 20
    assert np.asarray(kept_patches_picture(image, tome, side, layers)).shape[:2] == (224 + 18, 224)


def test_cli_chats_over_piped_input_with_a_metrics_line_per_reply(tiny_deep_dir, image_path, engine):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "llava.serve.cli", "--model-path", tiny_deep_dir, "--image-file", image_path,
         "--temperature", "0", "--max-new-tokens", "4", "--prune-method", "adsc", "--vision-token-budget", "12"],
        input="What is in the grid?\nAnd the first one?\n", capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("USER: ") == 3 and out.count("ASSISTANT: ") == 2
    layers = ", ".join(map(str, engine.model.prune_layers_for("adsc")))
    prefill = [line for line in out.splitlines() if line.startswith(f"[adsc @ 12 · layers {layers} — prefill of ")]
    answer = [line for line in out.splitlines() if line.startswith("[answer: 4 tokens")]
    assert len(prefill) == 2 and all("vision tokens/layer" in m and "KV" in m and "TTFT" in m for m in prefill)
    assert len(answer) == 2 and all("KV after it" in m for m in answer)
    first = engine.answer(open_image(image_path), [], "What is in the grid?", engine.setting("adsc", 12.0),
                          max_new_tokens=4)
    assert f"ASSISTANT: {first.text}\n" in out
    missing = subprocess.run([sys.executable, "-m", "llava.serve.cli", "--model-path", tiny_deep_dir, "--image-file",
                              image_path + ".missing"], input="", capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: image file not found")


@pytest.fixture(scope="module")
def playground_shaped_dir(tmp_path_factory):
    """A tiny checkpoint shaped like the playground's: 121 vision tokens, a context of 512."""
    import json

    from llava.tools.make_tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("playground_shaped")), seed=3, image_size=88,
                                patch_size=8)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["tokenizer_model_max_length"] = 512
    with open(config_file, "w") as f:
        json.dump(config, f)
    return path


def test_the_piped_chat_answers_with_its_defaults_on_a_512_token_context(playground_shaped_dir, image_path, caplog):
    """The default --max-new-tokens (512) equals the whole context: it is cut to what the prompt
    leaves, with one log line, instead of refusing every question."""
    import io
    import logging

    from llava.serve.cli import main

    stdout = io.StringIO()
    with caplog.at_level(logging.INFO, logger="llava.mm_utils"):
        replies = main(["--model-path", playground_shaped_dir, "--image-file", image_path, "--temperature", "0"],
                       stdin=io.StringIO("Describe the grid.\n\n"), stdout=stdout)
    assert len(replies) == 1 and "[error" not in stdout.getvalue()
    prompt = replies[0].metrics.prompt_tokens + 121  # text tokens + the image's 121
    assert 1 <= replies[0].metrics.new_tokens <= 512 - prompt
    assert f"max_new_tokens 512 cut to {512 - prompt}: the prompt is {prompt} tokens" in caplog.text


def test_a_piped_chat_that_answered_nothing_ends_with_exit_code_2(playground_shaped_dir, image_path):
    import io

    from llava.cli import UsageExit
    from llava.serve.cli import main

    stdout = io.StringIO()
    question = "word " * 600 + "\n\n"  # over the 512-token context by itself
    with pytest.raises(UsageExit) as exit_info:
        run_command(lambda argv: main(argv, stdin=io.StringIO(question), stdout=stdout),
                    ["--model-path", playground_shaped_dir, "--image-file", image_path])
    assert exit_info.value.code == 2
    assert str(exit_info.value).startswith("error: no question was answered (1 refused; the first: the prompt is")
    assert "fills the context length of 512: start a new chat or ask a shorter question" in str(exit_info.value)
