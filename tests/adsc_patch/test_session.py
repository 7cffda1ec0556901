"""``adsc_patch.pruning(model, spec)``: per-call pruning in this thread only, on transformers'
llava-hf model and on ours. Two threads with different specs on one model at once each get
what they get alone; a plain call beside an open session is unpruned; afterwards the model
is untouched. (What one spec computes is checked against slow references in test_patch.py
and test_llava_adsc.py; here the question is who sees which setting.)"""

import threading

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from adsc_patch import PruningSpec, ScheduleError, apply_adsc, pruning, remove_adsc
from llava.model.builder import load_pretrained_model
from llava.mm_utils import process_images
from tests.helpers import QUESTIONS, prompt_ids
from tests.llava.test_builder import _hf_inputs

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]

SPECS = {"adsc": PruningSpec("adsc", drop_ratio=0.5, layers=(1, 2)),
         "fastv": PruningSpec("fastv", budget=20, layers=(2,)),
         "pdrop": PruningSpec("pdrop", drop_ratio=0.5, layers=(1, 3))}
STEPS = 4


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    return LlavaForConditionalGeneration.from_pretrained(tiny_hf_dir).eval()


@pytest.fixture(scope="module")
def prompts(hf, tiny_hf_dir, random_images_module):
    tokenizer, _, processor, _ = load_pretrained_model(tiny_hf_dir, device="cpu")
    ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images_module, "left")
    return [(ids[row][mask[row].bool()][None], pixels[row:row + 1]) for row in range(ids.shape[0])]


@pytest.fixture(scope="module")
def random_images_module():
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for h, w in ((40, 50), (64, 30), (48, 48))]


def _call(hf, spec, ids, pixels):
    """One greedy call inside its own session: (tokens, kept vision positions per stage)."""
    with pruning(hf, spec) as session, torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=STEPS, min_new_tokens=STEPS,
                          do_sample=False)
    kept = [[p.tolist() for p in stage] for stage in session.trace.kept_vision_positions]
    return out[0, ids.shape[1]:].tolist(), kept


def test_two_threads_with_different_specs_each_get_their_single_threaded_result(hf, prompts):
    with torch.no_grad():
        stock = hf(input_ids=prompts[0][0], pixel_values=prompts[0][1]).logits
    names = ("adsc", "fastv")
    reference = {name: [_call(hf, SPECS[name], *prompt) for prompt in prompts] for name in names}
    assert reference["adsc"] != reference["fastv"]  # the two settings really differ
    assert [len(stage[0]) for stage in reference["adsc"][0][1]] == [36, 18, 9]  # drop half at 1 and at 2
    assert [len(stage[0]) for stage in reference["fastv"][0][1]] == [36, 4]  # (2 * 36 + 2 * 4) / 4 = 20

    results, errors = {name: [] for name in names}, []
    start = threading.Barrier(len(names))

    def work(name):
        try:
            start.wait()
            for prompt in prompts:
                results[name].append(_call(hf, SPECS[name], *prompt))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name in names:
        assert results[name] == reference[name], name
    # afterwards: transformers' own forwards, the same logits as before any session
    assert not any("forward" in vars(m) for m in (hf, hf.model, hf.model.language_model))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=prompts[0][0], pixel_values=prompts[0][1]).logits, stock)


def test_a_plain_call_beside_an_open_session_is_unpruned(hf, prompts):
    ids, pixels = prompts[1]
    with torch.no_grad():
        stock = hf(input_ids=ids, pixel_values=pixels).logits
    opened, done = threading.Event(), threading.Event()
    seen = {}

    def hold_a_session():
        with pruning(hf, SPECS["pdrop"]) as session, torch.no_grad():
            seen["pruned"] = hf(input_ids=ids, pixel_values=pixels).logits
            opened.set()
            done.wait(60)
        seen["trace"] = session.trace

    thread = threading.Thread(target=hold_a_session)
    thread.start()
    assert opened.wait(60)
    try:
        assert "forward" in vars(hf.model.language_model)  # installed while the session is open ...
        with torch.no_grad():
            beside = hf(input_ids=ids, pixel_values=pixels).logits
    finally:
        done.set()
        thread.join()
    assert torch.equal(beside, stock)  # ... yet this thread's call is transformers' own
    assert seen["pruned"].shape[1] == ids.shape[1] - 36 + 9  # 36 -> 18 at layer 1 -> 9 at layer 3
    assert [len(stage[0]) for stage in seen["trace"].kept_vision_positions] == [36, 18, 9]


def test_a_session_inside_apply_adsc_wins_and_apply_adsc_stays_after_it(hf, prompts):
    ids, pixels = prompts[2]
    apply_adsc(hf, SPECS["adsc"])
    try:
        with torch.no_grad():
            persistent = hf(input_ids=ids, pixel_values=pixels).logits
            with pruning(hf, SPECS["pdrop"]):
                inner = hf(input_ids=ids, pixel_values=pixels).logits
            after = hf(input_ids=ids, pixel_values=pixels).logits
        assert persistent.shape[1] == after.shape[1] == ids.shape[1] - 27 and torch.equal(persistent, after)
        assert inner.shape[1] == ids.shape[1] - 27 and not torch.equal(inner, persistent)  # pdrop's own picks
        assert "forward" in vars(hf.model.language_model)
    finally:
        remove_adsc(hf)
    assert "forward" not in vars(hf.model.language_model)


def test_bad_specs_are_refused_before_anything_changes(hf):
    with pytest.raises(ScheduleError, match="prune method 'pool': the llava-hf patch runs the in-decoder methods"):
        with pruning(hf, PruningSpec("pool", budget=9)):
            pass
    with pytest.raises(ScheduleError, match="prune method adsc: vision token budget 1"):
        with pruning(hf, PruningSpec("adsc", budget=1, layers=(3,))):
            pass
    with pytest.raises(TypeError, match="takes an adsc_patch.PruningSpec"):
        with pruning(hf, {"method": "adsc"}):
            pass
    assert "forward" not in vars(hf.model.language_model)


def test_on_our_model_a_session_is_the_per_call_setting_and_leaves_the_config(tiny_deep_dir, random_images):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    prompt = prompt_ids(tokenizer, QUESTIONS[0])[None]
    pixels = process_images(random_images[:1], processor, model.config)
    with pruning(model, PruningSpec("adsc", budget_fraction=1 / 3, layers=(2, 5))) as session, torch.no_grad():
        model(input_ids=prompt, images=pixels)
        assert session.schedule.prune_layers == (2, 5)
        kept = [len(stage[0]) for stage in session.trace.kept_vision_positions]
    assert kept == list(session.schedule.stage_tokens) and kept[0] == 36
    assert abs(session.schedule.average_tokens - 12) <= 0.5
    assert model.config.prune_layers == []


def test_last_trace_is_this_threads_own_never_another_requests(hf, prompts):
    """``last_trace`` (and ``model.pruning_trace``) answer for the calling thread: a thread that
    ran nothing sees none, and its own run does not replace what the main thread sees."""
    from adsc_patch import last_trace

    apply_adsc(hf, SPECS["adsc"])
    try:
        with torch.no_grad():
            hf(input_ids=prompts[0][0], pixel_values=prompts[0][1])
        mine = last_trace(hf)
        assert mine is not None and mine.token_positions.shape[0] == 1
        seen = {}

        def other():
            seen["before"] = last_trace(hf)
            ids = torch.cat([prompts[1][0]] * 2)
            with torch.no_grad():
                hf(input_ids=ids, pixel_values=torch.cat([prompts[1][1]] * 2))
            seen["after"] = last_trace(hf)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert seen["before"] is None
        assert seen["after"] is not None and seen["after"].token_positions.shape[0] == 2
        assert last_trace(hf) is mine
    finally:
        remove_adsc(hf)
