"""FastV's cheap scores against an eager forward's attention maps; its kept sets against their
top-k; the random selection's counts and nesting."""

import pytest
import torch

from adsc_patch import AdscPlan, ScheduleError, last_prefill_trace, pruned_decoder_forward
from adsc_patch.scores import last_query_index, query_attention, top_k_per_image
from adsc_patch.select import keep_sets
from tests.helpers import tiny_eager_decoder

pytestmark = pytest.mark.compat  # eager attention maps and hidden states are transformers' outputs

N_VISION, K = 16, 2


@pytest.fixture(scope="module")
def decoder():
    return tiny_eager_decoder(4)


def _batch(side):
    """Two rows with one 16-token image each, at different offsets; row 1 is 3 tokens shorter."""
    torch.manual_seed(1)
    lengths, starts = (30, 27), (4, 9)
    length = max(lengths)
    embeds = torch.randn(2, length, 64)
    mask = torch.zeros(2, length, dtype=torch.long)
    vision = torch.zeros(2, length, dtype=torch.bool)
    for row, (n, start) in enumerate(zip(lengths, starts)):
        offset = length - n if side == "left" else 0
        mask[row, offset:offset + n] = 1
        vision[row, offset + start:offset + start + N_VISION] = True
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return embeds, mask, vision, positions


@pytest.mark.parametrize("side", ["left", "right"])
def test_cheap_scores_equal_the_eager_attention_row_of_the_last_prompt_token(decoder, side):
    embeds, mask, vision, positions = _batch(side)
    with torch.no_grad():
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                      output_attentions=True, output_hidden_states=True)
        layer = decoder.layers[K - 1]
        hidden = out.hidden_states[K - 1]  # the input of layer K-1
        query = last_query_index(mask.bool())
        scores = query_attention(layer.self_attn, layer.input_layernorm(hidden),
                                 decoder.rotary_emb(hidden, position_ids=positions), mask.bool(), query)
    reference = out.attentions[K - 1].mean(dim=1)[torch.arange(2), query]  # (B, T)
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)
    assert query.tolist() == ([29, 29] if side == "left" else [29, 26])


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_pruned_loop_keeps_the_top_k_of_the_eager_attention(decoder, side):
    embeds, mask, vision, positions = _batch(side)
    plan = AdscPlan(prune_layers=(K,), drop_ratio=0.75, method="fastv", tokens_per_image=N_VISION)
    with torch.no_grad():
        reference = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                            output_attentions=True).attentions[K - 1].mean(dim=1)
        pruned_decoder_forward(decoder, plan, inputs_embeds=embeds, attention_mask=mask,
                               position_ids=positions, vision_mask=vision, use_cache=False)
    trace = last_prefill_trace(decoder)
    query = [29, 29] if side == "left" else [29, 26]  # each row's last real token, by the layout of _batch
    for row in range(2):
        vision_positions = torch.nonzero(vision[row]).flatten()
        row_scores = reference[row, query[row], vision_positions]
        expected = sorted(vision_positions[row_scores.topk(4).indices].tolist())
        assert trace.kept_vision_positions[1][row].tolist() == expected
        assert trace.tokens_per_layer[row].tolist() == [int(mask[row].sum())] * K + [int(mask[row].sum()) - 12] * 2


def test_top_k_per_image_keeps_k_in_each_span_and_nothing_outside():
    scores = torch.tensor([[9.0, 1.0, 5.0, 5.0, 2.0, 8.0, 0.0, 7.0]])
    keep = top_k_per_image(scores, [[(1, 3), (4, 4)]], [[2, 1]])
    assert keep[0].tolist() == [False, False, True, True, False, True, False, False]  # ties: the earlier slot


def test_fastv_takes_exactly_one_prune_layer_of_at_least_one():
    for layers in ((2, 6), (0,)):
        with pytest.raises(ScheduleError, match="fastv drops once"):
            AdscPlan(prune_layers=layers, drop_ratio=0.5, method="fastv")
    with pytest.raises(ScheduleError, match="unknown prune method 'fastvv'; known: adsc, fastv, pdrop, tome"):
        AdscPlan(method="fastvv")
    with pytest.raises(ScheduleError, match="prune method pool acts on the vision tower's features"):
        AdscPlan(method="pool")


def test_random_selection_is_fixed_nested_and_exact():
    sets = keep_sets(576, (361, 226, 141, 88), "random")
    assert [len(s) for s in sets] == [361, 226, 141, 88]
    assert all(set(b) <= set(a) for a, b in zip(sets, sets[1:]))
    assert sets == keep_sets.__wrapped__(576, (361, 226, 141, 88), "random")  # the same draw every time
    assert sets[0] != keep_sets(576, (361, 226, 141, 88), "uniform_1d")[0]
