"""Every baseline method in the LLaVA model, against references written here.

* in the decoder (fastv, pdrop): cached generation equals a slow loop that recomputes the
  whole sequence layer by layer without a cache, dropping at each prune layer what an
  eager attention map (transformers' own) of the shortened sequence ranks lowest;
* before the decoder (tome, visionzip, pool): cached generation equals greedy decoding by
  uncached full forwards (the reductions themselves are checked in tests/adsc_patch);
* for all: a padded batch (left, and right as in training) equals each prompt alone, and
  every layer's cache holds text + the method's vision tokens (+ generated - 1).
"""

import copy

import pytest
import torch

from adsc_patch import ScheduleError, compat
from adsc_patch.cache import cache_layer_lengths
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from tests.helpers import QUESTIONS, pad_batch, prompt_ids

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]

# the layer whose attention ranks the tokens dropped at prune layer p (FastV: K-1; PyramidDrop: p itself)
SCORE_LAYER = {"fastv": lambda p: p - 1, "pdrop": lambda p: p, "pdrop_original_ids": lambda p: p}
# PyramidDrop as released renumbers the survivors 0..len-1 after each drop; the others keep original ids
RENUMBERED = {"pdrop"}
STEPS = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
# tiny_deep: 8 decoder layers, 36 vision tokens (6x6), a 2-layer tower (1 layer runs for -2)
SETTINGS = {
    "fastv": dict(vision_token_budget=12.0),
    "pdrop": dict(vision_token_budget=12.0),
    "pdrop-3": dict(vision_token_budget=16.0, prune_layers=[1, 3, 5]),
    "pdrop_original_ids-3": dict(vision_token_budget=16.0, prune_layers=[1, 3, 5]),
    "tome": dict(vision_token_budget=20),
    "visionzip": dict(vision_token_budget=20),
    "visionzip_spread": dict(vision_token_budget=20),
    "pool": dict(vision_token_budget=20),
}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def deep(tiny_deep_dir, request):
    """The tiny model on one attention backend of the language model (the tower keeps its own)."""
    tokenizer, model, processor, context = load_pretrained_model(tiny_deep_dir, device="cpu")
    model.config._attn_implementation = request.param
    return tokenizer, model, processor, context


@pytest.fixture(params=list(SETTINGS))
def configured(deep, request):
    tokenizer, model, processor, _ = deep
    method = request.param.split("-")[0]
    schedule = model.configure_pruning(method=method, **SETTINGS[request.param])
    yield tokenizer, model, processor, schedule, method
    model.configure_pruning(method="adsc", prune_layers=[], drop_ratio=0.0)


def _causal(n, dtype):
    return torch.full((n, n), torch.finfo(dtype).min).triu(1)[None, None]


def _eager_row(eager, layer_idx, hidden, positions):
    """The last token's attention row in ``layer_idx`` from transformers' eager attention, mean over heads."""
    layer = eager.layers[layer_idx]
    _, weights = layer.self_attn(hidden_states=layer.input_layernorm(hidden),
                                 attention_mask=_causal(len(positions), hidden.dtype),
                                 position_embeddings=eager.rotary_emb(hidden, positions[None]))
    return weights[0].mean(0)[-1]


def _slow_forward(model, embeds, vision, schedule, method, rows_from=None):
    """Layer by layer without a cache, physically dropping at each prune layer; the kept sets
    are ranked from eager maps (``rows_from`` is None) or taken from ``rows_from`` (a previous
    call's kept sets, so generated tokens never change the prompt's selection)."""
    inner = model.model
    eager = copy.deepcopy(inner)
    eager.config._attn_implementation = "eager"
    score_at = {SCORE_LAYER[method](p): p for p in schedule.prune_layers}
    hidden, index = embeds, torch.arange(embeds.shape[1])
    rows, kept = {}, []

    def positions():  # of the shortened sequence: renumbered 0..len-1, or the original ids
        return torch.arange(len(index)) if method in RENUMBERED else index

    for layer_idx, layer in enumerate(inner.layers):
        if layer_idx in score_at and rows_from is None:
            rows[score_at[layer_idx]] = _eager_row(eager, layer_idx, hidden, positions())
        if layer_idx in schedule.prune_layers:
            stage = schedule.prune_layers.index(layer_idx) + 1
            slots = torch.nonzero(vision[index]).flatten()
            if rows_from is None:
                row = rows[layer_idx]
                order = torch.sort(row[slots], descending=True, stable=True).indices
                chosen = set(index[slots[order[: schedule.stage_tokens[stage]]]].tolist())
            else:
                chosen = rows_from[stage - 1]
            survive = torch.tensor([not bool(vision[i]) or int(i) in chosen for i in index])
            hidden, index = hidden[:, survive], index[survive]
            kept.append(set(index[vision[index]].tolist()))
        hidden = layer(hidden, attention_mask=_causal(len(index), hidden.dtype),
                       position_embeddings=inner.rotary_emb(hidden, positions()[None]))
    return model.lm_head(inner.norm(hidden))[0, -1], kept


def _reference_greedy(model, prompt, pixels, schedule, method, steps):
    tokens, kept = [], None
    with torch.no_grad():
        for _ in range(steps):
            sequence = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)])[None]
            if method in SCORE_LAYER:
                spliced = model.prepare_inputs_labels_for_multimodal(sequence, None, None, pixels)
                logits, step_kept = _slow_forward(model, spliced.inputs_embeds, spliced.vision_mask[0], schedule,
                                                  method, kept)
                kept = kept or step_kept
            else:  # the stock decoder on the reduced image, whole sequence, no cache
                logits = model(input_ids=sequence, images=pixels, use_cache=False).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens, kept


@pytest.mark.parametrize("question", [0, 2])
def test_cached_generation_equals_the_uncached_reference(configured, random_images, question):
    tokenizer, model, processor, schedule, method = configured
    prompt = prompt_ids(tokenizer, QUESTIONS[question])
    pixels = process_images(random_images[:1], processor, model.config)
    with torch.no_grad():
        generated = model.generate(prompt[None], images=pixels, **STEPS)
    trace = model.pruning_trace
    expected, kept = _reference_greedy(model, prompt, pixels, schedule, method, STEPS["max_new_tokens"])
    if kept is not None:
        assert [set(k[0].tolist()) for k in trace.kept_vision_positions[1:]] == kept
        assert [len(k) for k in kept] == list(schedule.stage_tokens[1:])
    else:
        assert trace.merge_groups.shape == (1, 36)
        assert len(trace.kept_vision_positions[0][0]) == schedule.stage_tokens[-1]
    assert generated[0].tolist() == expected


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_equals_each_prompt_alone(configured, random_images, side):
    tokenizer, model, processor, _, _ = configured
    seqs = [prompt_ids(tokenizer, QUESTIONS[0]), prompt_ids(tokenizer, QUESTIONS[1], image_first=False)]
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, side)
    pixels = process_images(random_images[:2], processor, model.config)
    with torch.no_grad():
        if side == "left":
            batched = model.generate(ids, images=pixels, attention_mask=mask, **STEPS)
            alone = [model.generate(s[None], images=pixels[i:i + 1], **STEPS)[0] for i, s in enumerate(seqs)]
            assert [row.tolist() for row in batched] == [a.tolist() for a in alone]
        else:  # right padding (training's layout)
            out = model(input_ids=ids, attention_mask=mask, images=pixels)
            for row, seq in enumerate(seqs):
                single = model(input_ids=seq[None], images=pixels[row:row + 1]).logits[0, -1]
                last = -1  # after a prune layer rows are compacted and right-aligned
                if out.token_positions is None:  # nothing dropped in the decoder: right-padded rows end early
                    last = int(model.prepare_inputs_labels_for_multimodal(
                        seq[None], None, None, pixels[row:row + 1]).attention_mask.sum()) - 1
                torch.testing.assert_close(out.logits[row, last], single, atol=1e-5, rtol=1e-5)


def test_every_layer_caches_text_and_the_methods_vision_tokens(configured, random_images):
    tokenizer, model, processor, schedule, _ = configured
    prompt = prompt_ids(tokenizer, QUESTIONS[0])
    pixels = process_images(random_images[:1], processor, model.config)
    with torch.no_grad():
        out = model(input_ids=prompt[None], images=pixels, use_cache=True)
        generated = model.generate(prompt[None], images=pixels, return_dict_in_generate=True, **STEPS)
    text = len(prompt) - 1
    expected = [text + n for n in schedule.tokens_per_layer]
    assert cache_layer_lengths(compat.output_cache(out)) == expected
    assert cache_layer_lengths(compat.output_cache(generated)) == [n + STEPS["max_new_tokens"] - 1 for n in expected]
    assert abs(schedule.average_tokens - model.config.vision_token_budget) <= 1


@pytest.mark.parametrize("method", ["fastv", "pdrop", "pdrop_original_ids"])
def test_with_labels_the_token_before_the_answer_ranks(deep, random_images, method):
    """Training: the answer is in the sequence, so the last token is not the query; the token
    before the answer is, as at inference (checked against the eager map at that token)."""
    tokenizer, model, processor, _ = deep
    schedule = model.configure_pruning(method=method, vision_token_budget=12.0)
    try:
        prompt = prompt_ids(tokenizer, QUESTIONS[1])
        answer = torch.tensor(tokenizer("a red square", add_special_tokens=False).input_ids)
        ids = torch.cat([prompt, answer])[None]
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt):] = ids[0, len(prompt):]
        pixels = process_images(random_images[:1], processor, model.config)
        with torch.no_grad():
            model(input_ids=ids, images=pixels, labels=labels)
            kept = [set(k[0].tolist()) for k in model.pruning_trace.kept_vision_positions[1:]]
            # the reference: the prompt alone (its last token is the one before the answer); and what
            # the last answer token would have chosen, which must differ for the check to mean anything
            spliced = model.prepare_inputs_labels_for_multimodal(prompt[None], None, None, pixels)
            _, expected = _slow_forward(model, spliced.inputs_embeds, spliced.vision_mask[0], schedule, method)
            whole = model.prepare_inputs_labels_for_multimodal(ids, None, None, pixels)
            _, last_token = _slow_forward(model, whole.inputs_embeds, whole.vision_mask[0], schedule, method)
        assert kept == expected and kept != last_token
    finally:
        model.configure_pruning(method="adsc", prune_layers=[], drop_ratio=0.0)


def test_configuration_errors_name_the_method_and_what_is_reachable(tiny_deep_dir):
    _, model, _, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    with pytest.raises(ScheduleError, match=r"fastv drops once, at one layer K >= 1 .*\[2, 5\]"):
        model.configure_pruning(method="fastv", prune_layers=[2, 5], vision_token_budget=12)
    with pytest.raises(ScheduleError, match=r"prune method fastv: .*below what prune layers \[6\] allow.*reachable "
                                            r"averages 27\.\d\d\.\.36"):
        model.configure_pruning(method="fastv", prune_layers=[6], vision_token_budget=4)
    with pytest.raises(ScheduleError, match=r"prune method tome: .*reachable 18\.\.36"):  # one tower layer runs
        model.configure_pruning(method="tome", vision_token_budget=12)
    assert model.config.prune_method == "adsc" and model.config.prune_layers == []  # refusals change nothing
