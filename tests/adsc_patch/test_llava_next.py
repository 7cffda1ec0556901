"""Pruning transformers' own ``LlavaNextForConditionalGeneration`` (CLIP tower, Llama) and
``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, Qwen2), tiny random ones built from their
config classes: anyres images, each a base view plus crops unpadded to its aspect ratio with a
newline token closing every line.

The rule (docs/architectures.md): the base view and the crops are two images, each on its own
2-D grid; newline tokens are never pruned. The expected layout comes from transformers' own
anyres functions (``get_anyres_image_grid_shape``, ``unpad_image``), the kept sets from the
rule written here (``tests.helpers.reference_uniform_2d``, eager attention rows ranked once at
the prompt's last token), the logits from the stock layers run one by one without a cache."""

import pytest
import torch
from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration)
from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                 image_size_to_num_patches, unpad_image)

from adsc_patch import PruningSpec, pruning, solve_drop_ratio
from adsc_patch.cache import cache_layer_lengths
from tests.helpers import cache_lengths_per_layer, eager_model, reference_uniform_2d, scheduled_cache_lengths

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]

IMAGE, SIDE, TILE = 100, 4, 16  # image token id; 4 x 4 patches of a 16-px tile
PINPOINTS = [[16, 32], [32, 16], [32, 32]]
SIZES = [(20, 30), (30, 14)]  # (height, width) of the two images
STEPS = 4


def _llava_next():
    return LlavaNextForConditionalGeneration, LlavaNextConfig(
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=TILE, patch_size=TILE // SIDE),
        image_grid_pinpoints=PINPOINTS, image_token_id=IMAGE, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _llava_onevision():
    return LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=TILE, patch_size=TILE // SIDE),
        image_grid_pinpoints=PINPOINTS, image_token_id=IMAGE, vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def next_model(request):
    return eager_model(*{"llava_next": _llava_next, "llava_onevision": _llava_onevision}[request.param]())


def _layout(height, width):
    """``(crop rows, crop cols)`` of an image by transformers' own anyres rule."""
    tiles_h, tiles_w = get_anyres_image_grid_shape((height, width), PINPOINTS, TILE)
    return tuple(unpad_image(torch.zeros(1, tiles_h * SIDE, tiles_w * SIDE), torch.tensor([height, width])).shape[1:])


def _prompt(image_sizes, seed):
    """``(ids, pixels, image_sizes, images)`` of one prompt with an image of each ``(height,
    width)``; ``images``: per image ``(base positions, crop positions, crop grid, newline
    positions)``, by transformers' own anyres rule (``_layout``)."""
    tokens, images = [5, 6], []
    for k, (height, width) in enumerate(image_sizes):
        rows, cols = _layout(height, width)
        start = len(tokens)
        base = list(range(start, start + SIDE * SIDE))
        crops, newlines = [], []
        at = start + SIDE * SIDE
        for _ in range(rows):
            crops += list(range(at, at + cols))
            newlines.append(at + cols)
            at += cols + 1
        images.append((base, crops, (rows, cols), newlines))
        tokens += [IMAGE] * (at - start) + [7 + k]
    tokens += [9, 10]
    patches = [image_size_to_num_patches(size, PINPOINTS, TILE) for size in image_sizes]
    pixels = torch.randn(len(image_sizes), max(patches), 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))
    return torch.tensor([tokens]), pixels, torch.tensor(image_sizes), images


def _inputs():
    return _prompt(SIZES, 0)


def _left_padded(prompts):
    """``(ids, mask, pixels, image sizes, images)`` of prompts left-padded to the longest (pad id
    0), their pixels padded to the most crops (transformers reads each image's own count off its
    size), ``images`` per row shifted by the row's padding."""
    length = max(ids.shape[1] for ids, *_ in prompts)
    patches = max(pixels.shape[1] for _, pixels, *_ in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    pixels, rows = [], []
    for row, (prompt, prompt_pixels, _, images) in enumerate(prompts):
        pad = length - prompt.shape[1]
        ids[row, pad:], mask[row, pad:] = prompt[0], 1
        pixels.append(torch.nn.functional.pad(prompt_pixels, (0, 0, 0, 0, 0, 0, 0, patches - prompt_pixels.shape[1])))
        rows.append([tuple([p + pad for p in part] if isinstance(part, list) else part for part in image)
                     for image in images])
    return ids, mask, torch.cat(pixels), torch.cat([p[2] for p in prompts]), rows


def _generate(model, ids, pixels, sizes, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, max_new_tokens=STEPS,
                              min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                              output_logits=True, suppress_tokens=[IMAGE], **kwargs)


def _groups(images):
    """The rule: ``(positions, grid)`` of each base view and each crop grid, two images apiece."""
    out = []
    for base, crops, grid, _ in images:
        out += [(list(base), (SIDE, SIDE)), (list(crops), tuple(grid))]
    return out


def _ratio_counts(n, layers, ratio):
    """One image's keep count after each prune layer: ``floor((1 - r) * n)`` of the previous."""
    counts = []
    for _ in layers:
        n = int((1 - ratio) * n)
        counts.append(n)
    return counts


def _causal(n):
    return torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]


def _reference(model, ids, pixels, sizes, images, method, layers, ratio, chosen=None):
    inner, text = model.model, model.model.language_model
    with torch.no_grad():
        embeds = text.embed_tokens(ids)
        features = torch.cat(inner.get_image_features(pixels, sizes, return_dict=True).pooler_output)
        embeds = embeds.masked_scatter((ids == IMAGE)[..., None].expand_as(embeds), features)
        groups = []  # (positions, grid) of each base view and each crop grid
        for base, crops, grid, _ in images:
            groups += [(base, (SIDE, SIDE)), (crops, grid)]
        counts = []
        for positions, _ in groups:
            n, image_counts = len(positions), []
            for _ in layers:
                n = int((1 - ratio) * n)
                image_counts.append(n)
            counts.append(image_counts)
        pruned = {p for positions, _ in groups for p in positions}
        hidden, index, kept_sets, fastv_row = embeds, torch.arange(ids.shape[1]), [], None
        first = 0

        def rope():
            positions = index if method != "pdrop" else first + torch.arange(len(index))
            return text.rotary_emb(hidden, positions[None])

        def eager_row(layer):
            _, weights = layer.self_attn(hidden_states=layer.input_layernorm(hidden),
                                         attention_mask=_causal(hidden.shape[1]), position_embeddings=rope())
            return weights[0].mean(0)[-1]

        for layer_idx, layer in enumerate(text.layers):
            if method == "fastv" and layer_idx + 1 in layers and chosen is None:
                fastv_row = eager_row(layer)
            if layer_idx in layers:
                stage = layers.index(layer_idx)
                if chosen is not None:
                    keep = chosen[stage]
                elif method == "adsc":
                    keep = {positions[i] for (positions, (rows, cols)), c in zip(groups, counts)
                            for i in reference_uniform_2d(rows, cols, c)[stage]}
                else:
                    row = fastv_row if method == "fastv" else eager_row(layer)
                    keep = set()
                    for (positions, _), c in zip(groups, counts):
                        present = [slot for slot, i in enumerate(index.tolist()) if i in positions]
                        order = torch.sort(row[present], descending=True, stable=True).indices
                        keep |= {int(index[present[o]]) for o in order[: c[stage]]}
                kept_sets.append(keep)
                survive = torch.tensor([int(i) not in pruned or int(i) in keep for i in index])
                hidden, index = hidden[:, survive], index[survive]
            out = layer(hidden, attention_mask=_causal(hidden.shape[1]), position_embeddings=rope())
            hidden = out[0] if isinstance(out, tuple) else out
        return model.lm_head(text.norm(hidden))[0, -1], kept_sets


@pytest.mark.parametrize("method", ["adsc", "fastv", "pdrop"])
def test_cached_generation_equals_the_uncached_reference_with_newlines_kept(next_model, method):
    ids, pixels, sizes, images = _inputs()
    assert [grid for _, _, grid, _ in images] == [(6, 8), (8, 4)]  # the two aspect ratios' unpadded crops
    layers = [2] if method == "fastv" else [1, 3]
    with pruning(next_model, PruningSpec(method, drop_ratio=0.5, layers=tuple(layers))) as session, torch.no_grad():
        out = next_model.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, max_new_tokens=STEPS,
                                  min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                  output_logits=True, suppress_tokens=[IMAGE])
    trace = session.trace
    newlines = {p for *_, lines in images for p in lines}
    for stage in trace.kept_vision_positions[1:]:
        assert not newlines & set(stage[0].tolist())  # never in the pruned set: they are kept as text
    sequence, chosen = ids, None
    for step in range(STEPS):
        reference, kept = _reference(next_model, sequence, pixels, sizes, images, method, layers, 0.5, chosen)
        if step == 0:
            assert [sorted(k) for k in kept] == [stage[0].tolist() for stage in trace.kept_vision_positions[1:]]
        chosen = chosen if method == "adsc" else (chosen or kept)
        torch.testing.assert_close(out.logits[step][0], reference, atol=1e-4, rtol=1e-4)
        sequence = torch.cat([sequence, out.sequences[:, ids.shape[1] + step:ids.shape[1] + step + 1]], dim=1)


BATCH = [SIZES, [(12, 34)]]  # two images (crops 6 x 8, 8 x 4), then one wide image (crops 2 x 8)


@pytest.mark.parametrize("method", ["adsc", "fastv", "pdrop"])
def test_each_layers_cache_holds_the_text_newlines_and_its_stages_vision_tokens(next_model, method):
    """After a cached greedy ``generate`` of ``STEPS`` tokens, each layer's cache (read off its
    key tensor) holds the text tokens (newlines among them: never pruned), the vision tokens
    its stage runs on (per base view and per crop grid ``floor((1 - r) * n)`` of the previous
    stage, summed) and ``STEPS - 1`` generated ones; in a left-padded batch, stage 0 the padded
    prompt and every later stage the row keeping the most (``scheduled_cache_lengths``)."""
    layers, ratio = ([2] if method == "fastv" else [1, 3]), 0.5
    spec = PruningSpec(method, drop_ratio=ratio, layers=tuple(layers))
    num_layers = next_model.config.text_config.num_hidden_layers

    def row(ids, images):
        sizes = [len(positions) for positions, _ in _groups(images)]
        stages = [sum(sizes), *(sum(c[s] for c in (_ratio_counts(n, layers, ratio) for n in sizes))
                                for s in range(len(layers)))]
        return ids.shape[1] - sum(sizes), stages

    ids, pixels, sizes, images = _inputs()
    with pruning(next_model, spec):
        cache = _generate(next_model, ids, pixels, sizes).past_key_values
    expected = scheduled_cache_lengths(num_layers, layers, [row(ids, images)], STEPS)
    newlines = sum(len(lines) for *_, lines in images)
    assert row(ids, images)[0] == 6 + newlines == 20  # 2 + 1 + 2 text tokens around two images, 6 + 8 newlines
    # 112 vision tokens (16 + 48 + 16 + 32), 56, 28, and 3 generated
    assert expected == ([135, 135, 79, 79, 79, 79] if method == "fastv" else [135, 79, 79, 51, 51, 51])
    assert cache_lengths_per_layer(cache) == expected
    assert cache_layer_lengths(cache) == expected

    prompts = [_prompt(image_sizes, seed) for seed, image_sizes in enumerate(BATCH)]
    padded, mask, pixels, sizes, _ = _left_padded(prompts)
    with pruning(next_model, spec):
        cache = _generate(next_model, padded, pixels, sizes, attention_mask=mask).past_key_values
    expected = scheduled_cache_lengths(num_layers, layers, [row(p[0], p[3]) for p in prompts], STEPS)
    assert expected[0] == padded.shape[1] + STEPS - 1
    assert cache_lengths_per_layer(cache) == expected


@pytest.mark.parametrize("method", ["adsc", "fastv", "pdrop"])
def test_a_left_padded_batch_of_images_of_different_aspect_ratios_equals_each_prompt_alone(next_model, method):
    """Two prompts (two images, crop grids 6 x 8 and 8 x 4; one image, crop grid 2 x 8) left-padded
    into one batch: every generated step's logits of each row == that prompt alone, and each
    row's images on the trace are its base views and crop grids (the rule), at its own positions."""
    layers = (2,) if method == "fastv" else (1, 3)
    prompts = [_prompt(image_sizes, seed) for seed, image_sizes in enumerate(BATCH)]
    assert [grid for _, _, grid, _ in prompts[1][3]] == [(2, 8)]
    spec = PruningSpec(method, drop_ratio=0.5, layers=layers)
    alone, kept_alone = [], []
    with pruning(next_model, spec) as session:
        for ids, pixels, sizes, _ in prompts:
            alone.append(_generate(next_model, ids, pixels, sizes).logits)
            kept_alone.append([stage[0].tolist() for stage in session.trace.kept_vision_positions])
        ids, mask, pixels, sizes, images = _left_padded(prompts)
        batch = _generate(next_model, ids, pixels, sizes, attention_mask=mask)
    trace = session.trace
    for row, (prompt, *_) in enumerate(prompts):
        pad = ids.shape[1] - prompt.shape[1]
        assert [(list(p), tuple(g)) for p, g in trace.images[row]] == _groups(images[row])
        assert [stage[row].tolist() for stage in trace.kept_vision_positions] == \
            [[p + pad for p in stage] for stage in kept_alone[row]]
        for step in range(STEPS):
            torch.testing.assert_close(batch.logits[step][row], alone[row][step][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["adsc", "pdrop"])
def test_a_budget_fraction_is_solved_for_each_base_view_and_crop_grid_from_its_own_size(next_model, method):
    """``budget_fraction`` on a left-padded batch: each base view (16 tokens) and each crop grid
    (48, 32 and 16 tokens) is its own image with its own schedule (``solve_drop_ratio`` at
    fraction x n, per stage and per layer, read per image off the trace); ADSC keeps each grid's
    own lattice (``reference_uniform_2d`` at those counts); every row == its prompt alone."""
    fraction, layers = 0.5, (1, 3)
    num_layers = next_model.config.text_config.num_hidden_layers
    prompts = [_prompt(image_sizes, seed) for seed, image_sizes in enumerate(BATCH)]
    spec = PruningSpec(method, budget_fraction=fraction, layers=layers)
    with pruning(next_model, spec) as session:
        alone = [_generate(next_model, ids, pixels, sizes).logits for ids, pixels, sizes, _ in prompts]
        ids, mask, pixels, sizes, images = _left_padded(prompts)
        batch = _generate(next_model, ids, pixels, sizes, attention_mask=mask)
    trace = session.trace
    per_layer = trace.tokens_per_image_per_layer(num_layers)
    seen = set()
    for row in range(len(prompts)):
        groups = _groups(images[row])
        assert [(list(p), tuple(g)) for p, g in trace.images[row]] == groups
        for (positions, (rows, cols)), counts in zip(groups, per_layer[row]):
            n = len(positions)
            seen.add(n)
            schedule = solve_drop_ratio(num_layers, n, layers, fraction * n)
            got = [len(set(positions) & set(stage[row].tolist())) for stage in trace.kept_vision_positions]
            assert got == list(schedule.stage_tokens), (row, n, got)
            assert counts == list(schedule.tokens_per_layer)
            if method == "adsc":
                lattice = reference_uniform_2d(rows, cols, list(schedule.stage_tokens[1:]))
                for stage, kept in enumerate(lattice, start=1):
                    assert sorted(set(positions) & set(trace.kept_vision_positions[stage][row].tolist())) == \
                        [positions[i] for i in kept]
        for step in range(STEPS):
            torch.testing.assert_close(batch.logits[step][row], alone[row][step][0], atol=1e-4, rtol=1e-4)
    assert seen == {16, 48, 32}  # base views, crop grids 6 x 8, 8 x 4 and 2 x 8 (16 too)
