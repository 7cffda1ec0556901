"""The pruned decoder loop on a bare transformers LlamaModel (no LLaVA code involved)."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel

from adsc_patch import AdscPlan, compat, image_spans, pruned_decoder_forward
from adsc_patch.cache import cache_layer_lengths, cache_nbytes
from adsc_patch.decoder import _compaction_index
from adsc_patch.profile import DecoderShape, kv_cache_bytes
from adsc_patch.select import keep_sets

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range

IMAGE = 16  # vision tokens per image (4 x 4 grid)


def _model(impl="sdpa", layers=6):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
    )
    config._attn_implementation = impl
    return LlamaModel(config).eval()


def _reference(model, plan, embeds, vision, positions):
    """One row, by hand: run layer by layer, gathering the survivors at each prune layer."""
    spans = [(s, n) for s, n in image_spans(vision[None], plan.tokens_per_image)[0]]
    schedule = plan.schedule(model.config.num_hidden_layers, IMAGE)
    kept_local = keep_sets(IMAGE, schedule.stage_tokens[1:], plan.selection, plan.grid)
    index = torch.arange(embeds.shape[0])
    hidden = embeds[None]
    for layer_idx, layer in enumerate(model.layers):
        if layer_idx in plan.prune_layers:
            stage = plan.prune_layers.index(layer_idx)
            allowed = set(range(embeds.shape[0]))
            for start, n in spans:
                allowed -= {start + i for i in range(n)} - {start + i for i in kept_local[stage]}
            keep = torch.tensor([int(i) in allowed for i in index])
            hidden, index = hidden[:, keep], index[keep]
        n = hidden.shape[1]
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        cos_sin = model.rotary_emb(hidden, positions[index][None])
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin)
    return model.norm(hidden)[0], index


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pruned_forward_matches_slow_reference(impl, side):
    model = _model(impl)
    plan = AdscPlan(prune_layers=(2, 4), drop_ratio=0.5, tokens_per_image=IMAGE)
    lengths = [40, 37, 30]
    images_at = [[5], [3, 3 + IMAGE], []]  # row 1: two adjacent images; row 2: text only
    batch, total = len(lengths), max(lengths)
    embeds = torch.randn(batch, total, 32)
    vision = torch.zeros(batch, total, dtype=torch.bool)
    mask = torch.zeros(batch, total, dtype=torch.long)
    for row, (n, starts) in enumerate(zip(lengths, images_at)):
        offset = total - n if side == "left" else 0
        mask[row, offset : offset + n] = 1
        for s in starts:
            vision[row, offset + s : offset + s + IMAGE] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = pruned_decoder_forward(
            model, plan, inputs_embeds=embeds, attention_mask=mask, position_ids=positions, vision_mask=vision,
            use_cache=False,
        )
        for row in range(batch):
            real = mask[row].bool()
            ref, index = _reference(model, plan, embeds[row][real], vision[row][real], positions[row][real])
            got = out.last_hidden_state[row, -ref.shape[0] :]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            offset = torch.nonzero(real)[0, 0]
            assert out.token_positions[row, -ref.shape[0] :].tolist() == (index + offset).tolist()
            assert (out.token_positions[row, : -ref.shape[0]] == -1).all()
    assert not torch.isnan(out.last_hidden_state).any()


def test_cache_holds_the_scheduled_tokens_per_layer_and_their_bytes():
    model = _model("sdpa", layers=6)
    plan = AdscPlan(prune_layers=(1, 3), drop_ratio=0.5, tokens_per_image=IMAGE)
    text = 9
    embeds = torch.randn(1, text + IMAGE, 32)
    vision = torch.zeros(1, text + IMAGE, dtype=torch.bool)
    vision[0, 4 : 4 + IMAGE] = True
    with torch.no_grad():
        out = pruned_decoder_forward(model, plan, inputs_embeds=embeds, vision_mask=vision, use_cache=True)
    schedule = plan.schedule(6, IMAGE)
    expected = [text + n for n in schedule.tokens_per_layer]
    assert cache_layer_lengths(compat.output_cache(out)) == expected == [25, 17, 17, 13, 13, 13]
    shape = DecoderShape.from_config(model.config)
    assert cache_nbytes(compat.output_cache(out)) == kv_cache_bytes(shape, expected, batch=1, bytes_per_value=4)


def test_decode_steps_attend_to_each_layers_cache_with_continuing_positions():
    model = _model("eager")
    plan = AdscPlan(prune_layers=(2,), drop_ratio=0.75, tokens_per_image=IMAGE)
    prompt = torch.randn(1, 6 + IMAGE, 32)
    vision = torch.zeros(1, prompt.shape[1], dtype=torch.bool)
    vision[0, 2 : 2 + IMAGE] = True
    step = torch.randn(1, 1, 32)
    with torch.no_grad():
        cache = compat.output_cache(
            pruned_decoder_forward(model, plan, inputs_embeds=prompt, vision_mask=vision, use_cache=True)
        )
        cached = pruned_decoder_forward(model, plan, inputs_embeds=step, past_key_values=cache, use_cache=True)
        full = pruned_decoder_forward(
            model, plan, inputs_embeds=torch.cat([prompt, step], 1),
            vision_mask=torch.cat([vision, torch.zeros(1, 1, dtype=torch.bool)], 1), use_cache=False,
        )
    torch.testing.assert_close(cached.last_hidden_state[0, -1], full.last_hidden_state[0, -1], atol=1e-5, rtol=1e-5)
    assert cache_layer_lengths(cache)[:2] == [6 + IMAGE + 1] * 2
    assert cache_layer_lengths(cache)[2:] == [6 + 4 + 1] * 4


def test_vision_tokens_with_a_filled_cache_are_refused():
    model = _model()
    plan = AdscPlan(prune_layers=(2,), drop_ratio=0.5, tokens_per_image=IMAGE)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        pruned_decoder_forward(model, plan, inputs_embeds=torch.randn(1, 4, 32), past_key_values=cache, use_cache=True)
        with pytest.raises(NotImplementedError, match="whole prompt"):
            pruned_decoder_forward(
                model, plan, inputs_embeds=torch.randn(1, IMAGE, 32), past_key_values=cache,
                vision_mask=torch.ones(1, IMAGE, dtype=torch.bool), use_cache=True,
            )


def test_output_flags_are_refused_while_pruning():
    model = _model()
    plan = AdscPlan(prune_layers=(2,), drop_ratio=0.5, tokens_per_image=IMAGE)
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        pruned_decoder_forward(model, plan, inputs_embeds=torch.randn(1, 4, 32), output_hidden_states=True)


def test_image_spans_split_runs_by_image_size():
    vision = torch.zeros(2, 40, dtype=torch.bool)
    vision[0, 2:34] = True
    vision[1, 10:26] = True
    assert image_spans(vision, IMAGE) == [[(2, 16), (18, 16)], [(10, 16)]]
    assert image_spans(vision, None) == [[(2, 32)], [(10, 16)]]
    vision[1, 26] = True
    with pytest.raises(ValueError, match="not a multiple"):
        image_spans(vision, IMAGE)


def test_compaction_right_aligns_kept_slots():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    src, valid = _compaction_index(keep)
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert src[0].tolist() == [0, 2, 3] and src[1, -1].item() == 2


def test_images_of_different_sizes_each_keep_their_own_lattice():
    """Per-call image spans (an adapter's layout for dynamic resolution): each image keeps the
    ADSC lattice of its own grid at counts from the ratio on its own length, written here by
    rule (``floor((1 - r) * n)`` per stage; ``tests.helpers.reference_uniform_2d``)."""
    from tests.helpers import reference_uniform_2d

    model = _model("eager")
    ratio = 0.5
    plan = AdscPlan(prune_layers=(2, 4), drop_ratio=ratio)  # no fixed size: the spans say
    rows = [[(3, (4, 4)), (22, (2, 3)), (31, (3, 5))], [(4, (5, 5))]]
    total = 50
    embeds = torch.randn(len(rows), total, 32)
    vision = torch.zeros(len(rows), total, dtype=torch.bool)
    images = []
    for row, placed in enumerate(rows):
        images.append([(start, h * w, (h, w)) for start, (h, w) in placed])
        for start, (h, w) in placed:
            vision[row, start:start + h * w] = True
    positions = torch.arange(total)
    with torch.no_grad():
        out = pruned_decoder_forward(model, plan, inputs_embeds=embeds, vision_mask=vision, use_cache=False,
                                     images=images)
        for row, placed in enumerate(rows):
            allowed_per_stage = []
            for stage in range(2):
                allowed = set(range(total))
                for start, (h, w) in placed:
                    counts, n = [], h * w
                    for _ in range(2):
                        n = int((1 - ratio) * n)
                        counts.append(n)
                    kept = reference_uniform_2d(h, w, counts)[stage]
                    allowed -= {start + i for i in range(h * w)} - {start + i for i in kept}
                allowed_per_stage.append(allowed)
            index, hidden = torch.arange(total), embeds[row][None]
            for layer_idx, layer in enumerate(model.layers):
                if layer_idx in plan.prune_layers:
                    allowed = allowed_per_stage[plan.prune_layers.index(layer_idx)]
                    keep = torch.tensor([int(i) in allowed for i in index])
                    hidden, index = hidden[:, keep], index[keep]
                n = hidden.shape[1]
                mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
                hidden = layer(hidden, attention_mask=mask,
                               position_embeddings=model.rotary_emb(hidden, positions[index][None]))
            reference = model.norm(hidden)[0]
            got = out.last_hidden_state[row, -reference.shape[0]:]
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
            assert out.token_positions[row, -reference.shape[0]:].tolist() == index.tolist()
    with pytest.raises(ValueError, match="do not cover exactly"):
        pruned_decoder_forward(model, plan, inputs_embeds=embeds, vision_mask=vision, use_cache=False,
                               images=[images[0][:2], images[1]])
    with pytest.raises(ValueError, match="not a 3x3 grid"):
        pruned_decoder_forward(model, plan, inputs_embeds=embeds, vision_mask=vision, use_cache=False,
                               images=[images[0], [(4, 25, (3, 3))]])
