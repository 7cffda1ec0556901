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

from adsc_patch import PruningSpec, pruning
from tests.helpers import eager_model, reference_uniform_2d

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


def _inputs():
    tokens, images = [5, 6], []  # images: (base positions, crop positions, crop grid, newline positions)
    for k, (height, width) in enumerate(SIZES):
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
    patches = [image_size_to_num_patches(size, PINPOINTS, TILE) for size in SIZES]
    pixels = torch.randn(len(SIZES), max(patches), 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    return torch.tensor([tokens]), pixels, torch.tensor(SIZES), images


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
