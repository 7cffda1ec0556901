"""Pruning transformers' own ``Qwen2_5_VLForConditionalGeneration`` and
``Qwen3VLForConditionalGeneration`` (tiny random ones built from their config classes): images
of different sizes, M-RoPE positions (interleaved in Qwen3-VL), Qwen3-VL's DeepStack features
added after the first layers, ``generate`` with a cache.

Every expectation comes from transformers' own pieces and rules written here: the image
features and their splice, ``get_rope_index`` on the full prompt (gathered for the survivors),
the stock decoder layers run one by one on the physically shortened sequence without a cache,
eager attention rows for the score-based methods (ranked once, at the prompt's last token), and
ADSC's lattice per image from ``tests.helpers.reference_uniform_2d``, and for Qwen3-VL its
DeepStack features (from its own ``get_image_features``) added after layer ``l`` at the image
tokens still present."""

import pytest
import torch
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)

from adsc_patch import PruningSpec, ScheduleError, apply_adsc, last_trace, pruning, remove_adsc, solve_drop_ratio
from adsc_patch.cache import cache_layer_lengths
from tests.helpers import cache_lengths_per_layer, eager_model, reference_uniform_2d, scheduled_cache_lengths

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]

IMAGE, VIDEO, START, END = 100, 101, 102, 103
LAYERS = 6
PATCH_DIM = 3 * 2 * 4 * 4  # channels x temporal patch x patch x patch
STEPS = 4


def _qwen2_5_vl():
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=None, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           fullatt_block_indexes=[0], window_size=8),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
    )
    return Qwen2_5_VLForConditionalGeneration, config


def _qwen3_vl():
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         bos_token_id=None, eos_token_id=None, pad_token_id=0),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
    )
    return Qwen3VLForConditionalGeneration, config


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen(request):
    return eager_model(*{"qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl}[request.param]())


def _prompt(grids, seed=0):
    """ids with each image (``(h, w)`` patches, merged 2 x 2) between START and END, its pixels and grid."""
    generator = torch.Generator().manual_seed(seed)
    ids, pixels, thw = [5, 6], [], []
    for k, (h, w) in enumerate(grids):
        ids += [START] + [IMAGE] * (h * w // 4) + [END, 7 + k]
        pixels.append(torch.randn(h * w, PATCH_DIM, generator=generator))
        thw.append([1, h, w])
    ids += [9, 10]
    ids = torch.tensor([ids])
    return ids, torch.cat(pixels), torch.tensor(thw)


def _generate(model, ids, pixels, thw, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, pixel_values=pixels, image_grid_thw=thw,
                              mm_token_type_ids=(ids == IMAGE).int(), max_new_tokens=STEPS, min_new_tokens=STEPS,
                              do_sample=False, return_dict_in_generate=True, output_logits=True,
                              suppress_tokens=[IMAGE, VIDEO, START, END], **kwargs)


def _causal(n):
    return torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]


def _eager_row(layer, hidden, rope):
    _, weights = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=_causal(hidden.shape[1]),
                                 position_embeddings=rope)
    return weights[0].mean(0)[-1]


def _reference_logits(model, ids, pixels, thw, method, layers, counts, chosen=None, every_slot=False):
    """The last position's logits of ``ids`` (prompt + generated tokens, one row) through the stock
    layers, no cache, dropping at ``layers`` what ``method``'s rule drops, ``counts[image][stage]``
    tokens kept per image. ``chosen``: the kept sets of the prompt's call (the score-based methods
    rank once, at the prompt's last token). Returns the logits and the kept sets per stage;
    ``every_slot``: the logits of every surviving token and their input positions instead."""
    inner, text = model.model, model.model.language_model
    with torch.no_grad():
        embeds = text.embed_tokens(ids)
        encoded = inner.get_image_features(pixels, thw, return_dict=True)
        features = torch.cat(encoded.pooler_output)
        embeds = embeds.masked_scatter((ids == IMAGE)[..., None].expand_as(embeds), features)
        deepstack = [torch.cat(f) for f in getattr(encoded, "deepstack_features", None) or []]  # Qwen3-VL
        positions, _ = inner.get_rope_index(ids, image_grid_thw=thw, attention_mask=None,
                                            mm_token_type_ids=(ids == IMAGE).int())
        images, at = [], 0
        vision = torch.nonzero(ids[0] == IMAGE).flatten().tolist()
        for _, h, w in thw.tolist():
            n = h * w // 4
            images.append((vision[at:at + n], (h // 2, w // 2)))
            at += n
        hidden, index, kept_sets = embeds, torch.arange(ids.shape[1]), []
        shift = torch.zeros(ids.shape[1], dtype=torch.long)  # PyramidDrop: the row's tokens dropped before each
        fastv_row = None

        def rope():
            return text.rotary_emb(hidden, (positions - shift)[:, :, index])

        for layer_idx, layer in enumerate(text.layers):
            if method == "fastv" and layer_idx + 1 in layers and chosen is None:
                fastv_row = _eager_row(layer, hidden, rope())  # layer K-1 ranks for K
            if layer_idx in layers:
                stage = layers.index(layer_idx)
                if chosen is not None:
                    keep = chosen[stage]
                elif method == "adsc":
                    keep = set()
                    for (tokens, (rows, cols)), image_counts in zip(images, counts):
                        keep |= {tokens[i] for i in reference_uniform_2d(rows, cols, image_counts)[stage]}
                else:  # top of the eager row of the last prompt token, per image, ties by position
                    row = fastv_row if method == "fastv" else _eager_row(layer, hidden, rope())
                    keep = set()
                    for (tokens, _), image_counts in zip(images, counts):
                        present = [slot for slot, i in enumerate(index.tolist()) if i in tokens]
                        order = torch.sort(row[present], descending=True, stable=True).indices
                        keep |= {int(index[present[o]]) for o in order[: image_counts[stage]]}
                kept_sets.append(keep)
                survive = torch.tensor([int(ids[0, i]) != IMAGE or int(i) in keep for i in index])
                if method == "pdrop":  # every axis down by the tokens dropped before (M-RoPE renumbering)
                    shift[index] += torch.cumsum((~survive).long(), 0) - (~survive).long()
                hidden, index = hidden[:, survive], index[survive]
            out = layer(hidden, attention_mask=_causal(hidden.shape[1]), position_embeddings=rope())
            hidden = out[0] if isinstance(out, tuple) else out
            if layer_idx < len(deepstack):  # DeepStack: added at the image tokens still present
                rank = {position: k for k, position in enumerate(vision)}
                for slot, position in enumerate(index.tolist()):
                    if position in rank:
                        hidden[0, slot] = hidden[0, slot] + deepstack[layer_idx][rank[position]]
        if every_slot:
            return model.lm_head(text.norm(hidden))[0], index
        return model.lm_head(text.norm(hidden))[0, -1], kept_sets


def _counts(layers, ratio, sizes):
    """Per image, its keep count after each prune layer: ``floor((1 - r) * n)`` of the previous."""
    out = []
    for n in sizes:
        image_counts = []
        for _ in layers:
            n = int((1 - ratio) * n)
            image_counts.append(n)
        out.append(image_counts)
    return out


@pytest.mark.parametrize("method", ["adsc", "fastv", "pdrop"])
def test_cached_generation_equals_the_uncached_reference_with_images_of_two_sizes(qwen, method):
    layers = [2] if method == "fastv" else [1, 3]
    if qwen.config.model_type == "qwen3_vl":
        # DeepStack adds features after layers 0, 1 and 2; the first prune (at layer 1's input; FastV:
        # layer 2's) comes before the last of them, so survivors must carry their own features on
        deepstack_layers = len(qwen.config.vision_config.deepstack_visual_indexes)
        assert deepstack_layers == 3 and layers[0] <= deepstack_layers - 1
    ratio = 0.5
    grids = [(8, 6), (4, 4)]  # 12 and 4 tokens: a 4 x 3 and a 2 x 2 merged grid
    ids, pixels, thw = _prompt(grids)
    with pruning(qwen, PruningSpec(method, drop_ratio=ratio, layers=tuple(layers))) as session:
        out = _generate(qwen, ids, pixels, thw)
    assert session.schedule is None  # per image: the trace says what ran
    sizes = [h * w // 4 for h, w in grids]
    counts = _counts(layers, ratio, sizes)
    trace = session.trace
    assert [len(stage[0]) for stage in trace.kept_vision_positions] == \
        [sum(sizes), *(sum(c[s] for c in counts) for s in range(len(layers)))]
    sequence, chosen = ids, None
    for step in range(STEPS):
        reference, kept = _reference_logits(qwen, sequence, pixels, thw, method, layers, counts, chosen)
        if step == 0:
            assert [sorted(k) for k in kept] == [stage[0].tolist() for stage in trace.kept_vision_positions[1:]]
        chosen = chosen if method == "adsc" else (chosen or kept)
        torch.testing.assert_close(out.logits[step][0], reference, atol=1e-4, rtol=1e-4)
        sequence = torch.cat([sequence, out.sequences[:, ids.shape[1] + step:ids.shape[1] + step + 1]], dim=1)


def test_a_budget_fraction_is_solved_for_each_image_from_its_own_size(qwen):
    """``budget_fraction`` on images of 12, 20 and 4 tokens: each image keeps what the solver
    gives for its own count (``solve_drop_ratio`` at fraction x n), read per image off the trace."""
    grids = [(8, 6), (8, 10), (4, 4)]
    ids, pixels, thw = _prompt(grids, seed=1)
    layers = (1, 3)
    with pruning(qwen, PruningSpec("adsc", budget_fraction=0.5, layers=layers)) as session:
        _generate(qwen, ids, pixels, thw)
    vision = torch.nonzero(ids[0] == IMAGE).flatten().tolist()
    at = 0
    for h, w in grids:
        n = h * w // 4
        image = set(vision[at:at + n])
        at += n
        expected = solve_drop_ratio(LAYERS, n, layers, 0.5 * n).stage_tokens
        got = [len(image & set(stage[0].tolist())) for stage in session.trace.kept_vision_positions]
        assert got == list(expected), (n, got, expected)
    per_layer = session.trace.tokens_per_image_per_layer(LAYERS)[0]
    assert [len(positions) for positions, _ in session.trace.images[0]] == [12, 20, 4]
    for (_, grid), counts, (h, w) in zip(session.trace.images[0], per_layer, grids):
        n = h * w // 4
        assert grid == (h // 2, w // 2)
        assert counts == list(solve_drop_ratio(LAYERS, n, layers, 0.5 * n).tokens_per_layer)


def _left_padded(prompts):
    """``(ids, mask, pixels, grids)`` of prompts left-padded to the longest (pad id 0)."""
    length = max(ids.shape[1] for ids, _, _ in prompts)
    ids = torch.stack([torch.cat([torch.zeros(length - p[0].shape[1], dtype=torch.long), p[0][0]]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(length - p[0].shape[1], dtype=torch.long),
                                   torch.ones(p[0].shape[1], dtype=torch.long)]) for p in prompts])
    return ids, mask, torch.cat([p[1] for p in prompts]), torch.cat([p[2] for p in prompts])


def test_a_left_padded_batch_of_prompts_with_different_images_equals_each_prompt_alone(qwen):
    spec = PruningSpec("adsc", drop_ratio=0.5, layers=(1, 3))
    prompts = [_prompt([(8, 6), (4, 4)], seed=2), _prompt([(4, 8)], seed=3)]
    alone = []
    with pruning(qwen, spec):
        for ids, pixels, thw in prompts:
            alone.append(_generate(qwen, ids, pixels, thw).logits)
        ids, mask, pixels, thw = _left_padded(prompts)
        batch = _generate(qwen, ids, pixels, thw, attention_mask=mask)
    for row in range(2):
        for step in range(STEPS):
            torch.testing.assert_close(batch.logits[step][row], alone[row][step][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["adsc", "fastv", "pdrop"])
def test_each_layers_cache_holds_the_text_and_its_stages_vision_tokens(qwen, method):
    """After a cached greedy ``generate`` of ``STEPS`` tokens, each layer's cache (read off its
    key tensor) holds the prompt's text tokens, the vision tokens its stage runs on (per image
    ``floor((1 - r) * n)`` of the previous stage, summed over images: ``_counts``) and
    ``STEPS - 1`` generated ones; in a left-padded batch, stage 0 the padded prompt and every
    later stage the row keeping the most tokens (``tests.helpers.scheduled_cache_lengths``)."""
    layers, ratio = ([2] if method == "fastv" else [1, 3]), 0.5
    spec = PruningSpec(method, drop_ratio=ratio, layers=tuple(layers))
    single = [(8, 6), (4, 4)]
    batch = [[(8, 6), (4, 4)], [(4, 8)]]

    def row(ids, grids):
        sizes = [h * w // 4 for h, w in grids]
        stages = [sum(sizes), *(sum(c[s] for c in _counts(layers, ratio, sizes)) for s in range(len(layers)))]
        return ids.shape[1] - sum(sizes), stages

    ids, pixels, thw = _prompt(single, seed=7)
    with pruning(qwen, spec):
        cache = _generate(qwen, ids, pixels, thw).past_key_values
    expected = scheduled_cache_lengths(LAYERS, layers, [row(ids, single)], STEPS)
    # 10 text tokens, 16 vision (12 + 4), 8 (6 + 3), 4 (3 + 1), and 3 generated
    assert expected == ([29, 29, 21, 21, 21, 21] if method == "fastv" else [29, 21, 21, 17, 17, 17])
    assert cache_lengths_per_layer(cache) == expected
    assert cache_layer_lengths(cache) == expected

    prompts = [_prompt(grids, seed=8 + k) for k, grids in enumerate(batch)]
    padded, mask, pixels, thw = _left_padded(prompts)
    with pruning(qwen, spec):
        cache = _generate(qwen, padded, pixels, thw, attention_mask=mask).past_key_values
    expected = scheduled_cache_lengths(LAYERS, layers, [row(p[0], g) for p, g in zip(prompts, batch)], STEPS)
    assert expected[0] == padded.shape[1] + STEPS - 1
    assert cache_lengths_per_layer(cache) == expected


def test_apply_adsc_prunes_until_removed_and_an_absolute_budget_is_refused(qwen):
    ids, pixels, thw = _prompt([(8, 6)], seed=4)
    stock = _generate(qwen, ids, pixels, thw).logits
    with pytest.raises(ScheduleError, match="images differ in size.*budget_fraction or drop_ratio"):
        apply_adsc(qwen, PruningSpec("adsc", budget=6, layers=(1, 3)))
    with pytest.raises(ScheduleError, match=f"the {qwen.config.model_type} patch runs the in-decoder methods"):
        apply_adsc(qwen, PruningSpec("pool", budget_fraction=0.5))
    apply_adsc(qwen, PruningSpec("adsc", budget_fraction=0.5, layers=(1, 3)))
    try:
        pruned = _generate(qwen, ids, pixels, thw).logits
        assert last_trace(qwen).tokens_per_layer[0, -1] < last_trace(qwen).tokens_per_layer[0, 0]
    finally:
        remove_adsc(qwen)
    assert not torch.allclose(pruned[0], stock[0])
    again = _generate(qwen, ids, pixels, thw).logits
    for step in range(STEPS):
        torch.testing.assert_close(again[step], stock[step])


def test_the_training_loss_of_a_pruned_forward_equals_the_references(qwen):
    """With labels, the loss over the pruned sequence: each text target predicted by the last
    token kept before it (the rule, written here), as the stock loss does without pruning."""
    ids, pixels, thw = _prompt([(8, 6), (4, 4)], seed=5)
    labels = ids.clone()
    labels[ids == IMAGE] = -100
    labels[0, :3] = -100
    layers, ratio = [1, 3], 0.5
    with pruning(qwen, PruningSpec("adsc", drop_ratio=ratio, layers=tuple(layers))):
        loss = qwen(input_ids=ids, pixel_values=pixels, image_grid_thw=thw, mm_token_type_ids=(ids == IMAGE).int(),
                    labels=labels).loss
    counts = _counts(layers, ratio, [12, 4])
    logits, index = _reference_logits(qwen, ids, pixels, thw, "adsc", layers, counts, every_slot=True)
    slot_of = {int(position): slot for slot, position in enumerate(index)}
    terms = []
    for position in range(1, ids.shape[1]):
        if labels[0, position] == -100:
            continue
        before = max(p for p in slot_of if p < position)
        terms.append(torch.nn.functional.cross_entropy(logits[slot_of[before]][None], labels[0, position][None]))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        stock = qwen(input_ids=ids, pixel_values=pixels, image_grid_thw=thw, mm_token_type_ids=(ids == IMAGE).int(),
                     labels=labels).loss
    assert not torch.isclose(loss, stock)  # the pruned sequence, not the full one


def test_a_videos_frames_are_each_pruned_on_their_own_grid(qwen):
    """Qwen2.5-VL video: two temporal patch groups of a 4 x 2 merged grid; each frame keeps ADSC's
    lattice of its own grid (rule written here), against the uncached stock loop with the model's
    own video features and ``get_rope_index``."""
    if qwen.config.model_type != "qwen2_5_vl":
        pytest.skip("Qwen3-VL's processor puts timestamp tokens between frames: each frame is then an image")
    frames, h, w = 2, 8, 4
    tokens = frames * h * w // 4
    ids = torch.tensor([[5, 6, START] + [VIDEO] * tokens + [END, 9, 10]])
    types = (ids == VIDEO).int() * 2
    pixels = torch.randn(frames * h * w, PATCH_DIM, generator=torch.Generator().manual_seed(6))
    thw = torch.tensor([[frames, h, w]])
    layers, ratio = [1, 3], 0.5
    with pruning(qwen, PruningSpec("adsc", drop_ratio=ratio, layers=tuple(layers))) as session, torch.no_grad():
        out = qwen.generate(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=thw, mm_token_type_ids=types,
                            max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                            output_logits=True, suppress_tokens=[IMAGE, VIDEO, START, END])
    grid = (h // 2, w // 2)
    counts = _counts(layers, ratio, [grid[0] * grid[1]])[0]
    lattice = reference_uniform_2d(grid[0], grid[1], counts)
    first = int(torch.nonzero(ids[0] == VIDEO)[0])
    expected = [sorted(first + f * 8 + i for f in range(frames) for i in lattice[stage]) for stage in range(2)]
    assert [stage[0].tolist() for stage in session.trace.kept_vision_positions[1:]] == expected
    inner, text = qwen.model, qwen.model.language_model
    sequence = ids
    with torch.no_grad():
        features = torch.cat(inner.get_video_features(pixels, thw, return_dict=True).pooler_output)
        for step in range(STEPS):
            types = (sequence == VIDEO).int() * 2
            embeds = text.embed_tokens(sequence).masked_scatter((sequence == VIDEO)[..., None].expand(
                *sequence.shape, features.shape[-1]), features)
            positions, _ = inner.get_rope_index(sequence, mm_token_type_ids=types, video_grid_thw=thw)
            hidden, index = embeds, torch.arange(sequence.shape[1])
            for layer_idx, layer in enumerate(text.layers):
                if layer_idx in layers:
                    keep = set(expected[layers.index(layer_idx)])
                    survive = torch.tensor([int(sequence[0, i]) != VIDEO or int(i) in keep for i in index])
                    hidden, index = hidden[:, survive], index[survive]
                result = layer(hidden, attention_mask=_causal(hidden.shape[1]),
                               position_embeddings=text.rotary_emb(hidden, positions[:, :, index]))
                hidden = result[0] if isinstance(result, tuple) else result
            reference = qwen.lm_head(text.norm(hidden))[0, -1]
            torch.testing.assert_close(out.logits[step][0], reference, atol=1e-4, rtol=1e-4)
            sequence = torch.cat([sequence, out.sequences[:, ids.shape[1] + step:ids.shape[1] + step + 1]], dim=1)
