"""PyramidDrop in the pruned loop against a slow reference written here: eager attention maps
of each prune layer on the physically shortened sequence, layer by layer; the multi-query
rows against eager maps; the training query (the token before each answer)."""

import pytest
import torch

from adsc_patch import AdscPlan, pruned_decoder_forward
from adsc_patch.scores import answer_query_mask, query_attention
from tests.helpers import tiny_eager_decoder

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]  # eager maps are transformers' outputs

N_VISION, PRUNE_LAYERS, RATIO = 16, (1, 3), 0.5  # 16 -> 8 -> 4 vision tokens


@pytest.fixture(scope="module")
def decoder():
    return tiny_eager_decoder(5)


def _prompt(start=5, length=30):
    torch.manual_seed(2)
    embeds = torch.randn(1, length, 64)
    vision = torch.zeros(1, length, dtype=torch.bool)
    vision[0, start:start + N_VISION] = True
    return embeds, vision


def _eager_rows(decoder, layer, hidden, index, queries):
    """Attention rows of ``queries`` (slot indices) in ``layer``, from transformers' eager attention."""
    n = hidden.shape[1]
    mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    _, weights = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                                 position_embeddings=decoder.rotary_emb(hidden, index[None]))
    return weights[0].mean(0)[queries].mean(0)


def _slow_pdrop(decoder, embeds, vision, query_positions):
    """PyramidDrop by hand: at each prune layer rank the present vision tokens by the eager
    attention of the query tokens in that layer, keep the top half, then run the layer."""
    hidden, index = embeds, torch.arange(embeds.shape[1])
    kept_per_stage = []
    with torch.no_grad():
        for layer_idx, layer in enumerate(decoder.layers):
            if layer_idx in PRUNE_LAYERS:
                queries = [int(torch.nonzero(index == q)) for q in query_positions]
                row = _eager_rows(decoder, layer, hidden, index, queries)
                slots = torch.nonzero(vision[0, index]).flatten()
                keep = slots[torch.sort(row[slots], descending=True, stable=True).indices[: len(slots) // 2]]
                survive = ~vision[0, index]
                survive[keep] = True
                hidden, index = hidden[:, survive], index[survive]
                kept_per_stage.append(sorted(index[vision[0, index]].tolist()))
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=decoder.rotary_emb(hidden, index[None]))
    return decoder.norm(hidden), kept_per_stage


@pytest.mark.parametrize("queries", ["last", "answers"])
def test_every_stage_keeps_the_top_half_of_the_eager_attention_of_the_query(decoder, queries):
    embeds, vision = _prompt()
    plan = AdscPlan(prune_layers=PRUNE_LAYERS, drop_ratio=RATIO, method="pdrop", tokens_per_image=N_VISION)
    query_mask = None
    query_positions = [embeds.shape[1] - 1]
    if queries == "answers":  # two answer spans: the tokens before them rank, averaged
        labels = torch.full((1, embeds.shape[1]), -100)
        labels[0, 24:26] = 7
        labels[0, 28:30] = 7
        query_mask = answer_query_mask(labels)
        query_positions = [23, 27]
        assert torch.nonzero(query_mask[0]).flatten().tolist() == query_positions
    with torch.no_grad():
        out = pruned_decoder_forward(decoder, plan, inputs_embeds=embeds, vision_mask=vision, use_cache=False,
                                     query_mask=query_mask)
    expected_hidden, expected_kept = _slow_pdrop(decoder, embeds, vision, query_positions)
    trace = decoder.adsc_trace
    assert [k[0].tolist() for k in trace.kept_vision_positions[1:]] == expected_kept
    assert [len(k) for k in expected_kept] == [8, 4]
    torch.testing.assert_close(out.last_hidden_state, expected_hidden, atol=1e-5, rtol=1e-5)


def test_several_query_rows_are_the_mean_of_their_eager_rows(decoder):
    embeds, _ = _prompt()
    with torch.no_grad():
        out = decoder(inputs_embeds=embeds, output_attentions=True, output_hidden_states=True)
        layer, hidden = decoder.layers[2], out.hidden_states[2]
        positions = torch.arange(embeds.shape[1])[None]
        queries = torch.zeros(1, embeds.shape[1], dtype=torch.bool)
        queries[0, [9, 20, 29]] = True
        rows = query_attention(layer.self_attn, layer.input_layernorm(hidden),
                               decoder.rotary_emb(hidden, position_ids=positions), torch.ones_like(queries), queries)
    reference = out.attentions[2][0].mean(0)[[9, 20, 29]].mean(0)
    torch.testing.assert_close(rows[0], reference, atol=1e-5, rtol=1e-5)
