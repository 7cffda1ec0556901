"""PyramidDrop in the pruned loop against a slow reference written here: eager attention maps
of each prune layer on the physically shortened sequence, layer by layer; the multi-query
rows against eager maps; the training query (the token before each answer)."""

import pytest
import torch
from transformers import DynamicCache

from adsc_patch import AdscPlan, compat, last_prefill_trace, pruned_decoder_forward
from adsc_patch.scores import answer_query_mask, query_attention
from tests.helpers import tiny_eager_decoder

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]  # eager maps are transformers' outputs

N_VISION, PRUNE_LAYERS, RATIO = 16, (1, 3), 0.5  # 16 -> 8 -> 4 vision tokens


@pytest.fixture(scope="module")
def decoder():
    return tiny_eager_decoder(5)


@pytest.fixture(scope="module")
def position_sensitive():
    """RoPE at theta 3: attention changes visibly when positions move by a few tokens."""
    return tiny_eager_decoder(5, rope_theta=3.0)


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


def _slow_pdrop(decoder, embeds, vision, query_positions, renumber, prune_layers=PRUNE_LAYERS, keep=None):
    """PyramidDrop by hand: at each prune layer rank the present vision tokens by the eager
    attention of the query tokens in that layer, keep the top half (or ``keep[stage]`` tokens),
    then run the layer. Positions: the original ids, or (``renumber``, the release's
    ``pdrop_forward``) ``0..len-1`` of the physically shortened sequence after each drop."""
    hidden, index = embeds, torch.arange(embeds.shape[1])
    kept_per_stage = []
    with torch.no_grad():
        for layer_idx, layer in enumerate(decoder.layers):
            positions = torch.arange(len(index)) if renumber else index
            if layer_idx in prune_layers:
                stage = prune_layers.index(layer_idx)
                queries = [int(torch.nonzero(index == q)) for q in query_positions]
                row = _eager_rows(decoder, layer, hidden, positions, queries)
                slots = torch.nonzero(vision[0, index]).flatten()
                count = len(slots) // 2 if keep is None else keep[stage]
                chosen = slots[torch.sort(row[slots], descending=True, stable=True).indices[:count]]
                survive = ~vision[0, index]
                survive[chosen] = True
                hidden, index = hidden[:, survive], index[survive]
                kept_per_stage.append(sorted(index[vision[0, index]].tolist()))
                positions = torch.arange(len(index)) if renumber else index
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=decoder.rotary_emb(hidden, positions[None]))
        return decoder.norm(hidden), kept_per_stage


# method -> whether the release renumbers the survivors (PyramidDrop's pdrop_forward does)
VARIANTS = {"pdrop": True, "pdrop_original_ids": False}


@pytest.mark.parametrize("method", list(VARIANTS))
@pytest.mark.parametrize("queries", ["last", "answers"])
def test_every_stage_keeps_the_top_half_of_the_eager_attention_of_the_query(decoder, queries, method):
    embeds, vision = _prompt()
    plan = AdscPlan(prune_layers=PRUNE_LAYERS, drop_ratio=RATIO, method=method, tokens_per_image=N_VISION)
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
    expected_hidden, expected_kept = _slow_pdrop(decoder, embeds, vision, query_positions, VARIANTS[method])
    trace = last_prefill_trace(decoder)
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


def _batch_prompts():
    """Two prompts of different lengths (images at different offsets), left-padded into one batch."""
    torch.manual_seed(5)
    lengths, starts = (30, 25), (5, 3)
    prompts, visions = [], []
    for length, start in zip(lengths, starts):
        prompts.append(torch.randn(1, length, 64))
        vision = torch.zeros(1, length, dtype=torch.bool)
        vision[0, start:start + N_VISION] = True
        visions.append(vision)
    width = max(lengths)
    embeds = torch.zeros(2, width, 64)
    mask = torch.zeros(2, width, dtype=torch.long)
    vision = torch.zeros(2, width, dtype=torch.bool)
    for row, (prompt, v) in enumerate(zip(prompts, visions)):
        embeds[row, width - prompt.shape[1]:] = prompt[0]
        mask[row, width - prompt.shape[1]:] = 1
        vision[row, width - prompt.shape[1]:] = v[0]
    return prompts, visions, embeds, mask, vision


def _cached_steps(decoder, method, embeds, mask, vision, steps):
    """Our pruned loop as generate drives it: prefill with a cache, then one token per step with
    position ids ``last + 1`` and the 2-D mask growing by one column."""
    plan = AdscPlan(prune_layers=PRUNE_LAYERS, drop_ratio=RATIO, method=method, tokens_per_image=N_VISION)
    cache = DynamicCache(config=decoder.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = []
    with torch.no_grad():
        out = pruned_decoder_forward(decoder, plan, inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     vision_mask=vision, use_cache=True, **compat.cache_kwargs(cache))
        outs.append(out.last_hidden_state[:, -1])
        last = positions[:, -1:]
        for step in steps:
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            last = last + 1
            out = pruned_decoder_forward(decoder, plan, inputs_embeds=step, attention_mask=mask, position_ids=last,
                                         use_cache=True, **compat.cache_kwargs(cache))
            outs.append(out.last_hidden_state[:, -1])
    return torch.stack(outs, 1), cache


@pytest.mark.parametrize("method", list(VARIANTS))
def test_cached_decode_of_a_left_padded_batch_equals_each_prompts_uncached_reference(position_sensitive, method):
    """Prefill and 5 decode steps: each row against the slow loop on its own unpadded prompt plus
    the tokens so far, recomputed without a cache; the query stays the last prompt token (the
    release ranks once, at prefill). Renumbered: the released positions at every stage, and
    decode positions shifted down by what was dropped before each stage."""
    prompts, visions, embeds, mask, vision = _batch_prompts()
    torch.manual_seed(6)
    steps = [torch.randn(2, 1, 64) for _ in range(5)]
    decoder = position_sensitive
    ours, cache = _cached_steps(decoder, method, embeds, mask, vision, steps)
    for row in range(2):
        for renumber in (True, False):
            expected = []
            for t in range(len(steps) + 1):
                sequence = torch.cat([prompts[row], *[s[row:row + 1] for s in steps[:t]]], 1)
                seq_vision = torch.cat([visions[row], torch.zeros(1, t, dtype=torch.bool)], 1)
                hidden, _ = _slow_pdrop(decoder, sequence, seq_vision, [prompts[row].shape[1] - 1], renumber)
                expected.append(hidden[0, -1])
            expected = torch.stack(expected)
            if renumber == VARIANTS[method]:
                torch.testing.assert_close(ours[row], expected, atol=1e-5, rtol=1e-5)
            else:  # negative control: the other convention misses the tolerance a hundredfold
                assert (ours[row] - expected).abs().max() > 1e-3
    # every layer cached text + its stage's vision tokens (+ 5 generated), per the schedule 16 -> 8 -> 4
    text = int(mask.sum(1).max()) - N_VISION
    assert [cache.get_seq_length(i) for i in range(5)] == [30 + 5] + [text + 8 + 5] * 2 + [text + 4 + 5] * 2
