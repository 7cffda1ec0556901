"""adsc_patch.tome: ToMe in a tiny CLIP tower, against slow references written here."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from adsc_patch.compat import clip_vision_parts
from adsc_patch.reduction import group_sizes
from adsc_patch.schedule import ScheduleError
from adsc_patch.tome import (
    Merge,
    ToMeState,
    bipartite_soft_matching,
    merge_tokens,
    proportional_attention,
    tome_encode,
    tome_layer,
    tome_merge_counts,
    tome_vision_forward,
    track_sources,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLEMENTATIONS = ("eager", "sdpa")
NUM_PATCHES = 49  # 28 / 4 = 7 -> 7 x 7 patches, plus CLS
NUM_LAYERS = 4  # select_layer -2 -> layers 0..2 run


@pytest.fixture(scope="module")
def towers():
    """The same tiny random CLIP tower under eager and sdpa attention."""
    config = CLIPVisionConfig(image_size=28, patch_size=4, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=NUM_LAYERS, num_attention_heads=2)
    torch.manual_seed(0)
    models = {}
    for impl in IMPLEMENTATIONS:
        models[impl] = CLIPVisionModel._from_config(config, attn_implementation=impl).eval()
    models["sdpa"].load_state_dict(models["eager"].state_dict())
    return models


@pytest.fixture()
def pixels():
    return torch.randn(2, 3, 28, 28)


# ----------------------------------------------------------------------------- references
def ref_cap(num_tokens: int) -> int:
    """Unprotected A tokens with one protected token: even indices 2, 4, ... < T."""
    return len(range(2, num_tokens, 2))


def ref_matching(metric: torch.Tensor, r: int, protected: int = 1) -> list[list[int]]:
    """dest per image by brute force: cosine of every A-B pair, best B, top-r A, ToMe's order."""
    out = []
    for image in metric.double():
        num_tokens = image.shape[0]
        a_set = [t for t in range(protected, num_tokens) if t % 2 == 0]
        b_set = [t for t in range(protected, num_tokens) if t % 2 == 1]
        best = {}
        for a in a_set:
            sims = [(float(torch.dot(image[a], image[b]) / (image[a].norm() * image[b].norm())), b) for b in b_set]
            top = max(s for s, _ in sims)
            best[a] = (top, min(b for s, b in sims if s == top))
        chosen = sorted(a_set, key=lambda a: (-best[a][0], a))[:r]
        kept = [a for a in a_set if a not in chosen]
        order = list(range(protected)) + kept + b_set
        dest = [0] * num_tokens
        for new, t in enumerate(order):
            dest[t] = new
        for a in chosen:
            dest[a] = dest[best[a][1]]
        out.append(dest)
    return out


def ref_merge(x: torch.Tensor, sizes: torch.Tensor, dest: list[list[int]]):
    """Size-weighted means and summed sizes, one output group at a time."""
    xs, ss = [], []
    for i, image_dest in enumerate(dest):
        num_out = max(image_dest) + 1
        rows, row_sizes = [], []
        for j in range(num_out):
            members = [t for t, d in enumerate(image_dest) if d == j]
            weight = sum(int(sizes[i, t]) for t in members)
            rows.append(sum(int(sizes[i, t]) * x[i, t].double() for t in members) / weight)
            row_sizes.append(weight)
        xs.append(torch.stack(rows))
        ss.append(row_sizes)
    return torch.stack(xs), torch.tensor(ss)


def ref_attention(attention, hidden: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + log size_k) v per head, heads concatenated, through out_proj."""
    h = hidden.double()

    def project(linear):
        return h @ linear.weight.double().T + linear.bias.double()

    q, k, v = project(attention.q_proj), project(attention.k_proj), project(attention.v_proj)
    head_dim = attention.head_dim
    n, num_tokens, dim = h.shape
    out = torch.zeros(n, num_tokens, dim, dtype=torch.float64)
    for i in range(n):
        for head in range(dim // head_dim):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            logits = q[i, :, cols] @ k[i, :, cols].T * head_dim ** -0.5 + sizes[i].double().log()[None, :]
            out[i, :, cols] = torch.softmax(logits, dim=-1) @ v[i, :, cols]
    return out @ attention.out_proj.weight.double().T + attention.out_proj.bias.double()


def reachable_by_enumeration(num_patches: int, num_layers: int) -> set[int]:
    finals = set()

    def walk(tokens, depth):
        if depth == num_layers:
            finals.add(tokens - 1)
            return
        for r in range(ref_cap(tokens) + 1):
            walk(tokens - r, depth + 1)

    walk(num_patches + 1, 0)
    return finals


def check_counts(counts, num_patches, budget):
    tokens = num_patches + 1
    for r in counts:
        assert 0 <= r <= ref_cap(tokens)
        tokens -= r
    assert tokens - 1 == budget
    assert sum(counts) == num_patches - budget


# ----------------------------------------------------------------------------- matching
def test_matching_merges_the_r_most_similar_pairs_like_brute_force():
    torch.manual_seed(1)
    for num_tokens, r in ((15, 4), (16, 7), (9, 0), (10, 4)):
        metric = torch.randn(3, num_tokens, 6)
        merge = bipartite_soft_matching(metric, r)
        assert merge.num_out == num_tokens - r
        assert merge.dest.tolist() == ref_matching(metric, r)


def test_matching_ties_go_to_the_lowest_index():
    metric = torch.zeros(1, 11, 2)
    metric[..., 0] = 1.0  # every A-B cosine is exactly 1
    dest = bipartite_soft_matching(metric, 3).dest[0].tolist()
    # A = 2, 4, 6, 8, 10; B = 1, 3, 5, 7, 9. A 2, 4, 6 merge (lowest first) into B 1 (lowest).
    # Order after: [CLS, A 8, A 10, B 1, B 3, B 5, B 7, B 9].
    assert dest == [0, 3, 3, 4, 3, 5, 3, 6, 1, 7, 2]
    assert bipartite_soft_matching(metric, 3).dest.tolist() == ref_matching(metric, 3)


def test_matching_never_touches_protected_tokens_and_refuses_too_many_merges():
    torch.manual_seed(2)
    metric = torch.randn(2, 12, 4)
    metric[:, 1] = metric[:, 4]  # token 1 is the perfect match of A token 4, but protected
    for protected in (1, 2, 3):
        dest = bipartite_soft_matching(metric, 3, protected=protected).dest
        assert dest.tolist() == ref_matching(metric, 3, protected)
        for t in range(protected):
            assert (dest[:, t] == t).all() and ((dest == t).sum(1) == 1).all()
    with pytest.raises(ValueError, match="0..5"):
        bipartite_soft_matching(metric, 6)


# ----------------------------------------------------------------------------- merging
def test_merge_is_the_size_weighted_mean_and_sizes_add():
    torch.manual_seed(3)
    n, num_tokens, dim = 2, 13, 5
    x = torch.randn(n, num_tokens, dim)
    sizes = torch.randint(1, 9, (n, num_tokens))
    merge = bipartite_soft_matching(torch.randn(n, num_tokens, 4), 5)
    merged, new_sizes = merge_tokens(x, sizes, merge)
    want_x, want_sizes = ref_merge(x, sizes, merge.dest.tolist())
    torch.testing.assert_close(merged.double(), want_x, atol=1e-5, rtol=1e-5)
    assert new_sizes.tolist() == want_sizes.tolist()
    assert (new_sizes.sum(1) == sizes.sum(1)).all()
    # an arbitrary many-to-one map, not from the matching
    dest = torch.tensor([[0, 1, 1, 2, 0, 2, 2, 1, 3, 3, 0, 1, 2]] * n)
    merged, new_sizes = merge_tokens(x, sizes, Merge(dest, 4))
    want_x, want_sizes = ref_merge(x, sizes, dest.tolist())
    torch.testing.assert_close(merged.double(), want_x, atol=1e-5, rtol=1e-5)
    assert new_sizes.tolist() == want_sizes.tolist()
    half, _ = merge_tokens(x.bfloat16(), sizes, Merge(dest, 4))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), want_x, atol=3e-2, rtol=3e-2)


def test_sources_follow_every_merge():
    torch.manual_seed(4)
    n, num_tokens = 2, 17
    source = torch.arange(1, num_tokens).expand(n, -1)
    sizes = torch.ones(n, num_tokens, dtype=torch.long)
    history = []  # per image, the original patches of every current token, by hand
    groups = [[[]] + [[p] for p in range(num_tokens - 1)] for _ in range(n)]
    for r in (5, 3, 2):
        merge = bipartite_soft_matching(torch.randn(n, sizes.shape[1], 4), r)
        _, sizes = merge_tokens(torch.zeros(n, sizes.shape[1], 1), sizes, merge)
        source = track_sources(source, merge)
        for i in range(n):
            new = [[] for _ in range(merge.num_out)]
            for t, d in enumerate(merge.dest[i].tolist()):
                new[d] += groups[i][t]
            groups[i] = new
        history.append(sizes.shape[1])
    assert history == [12, 9, 7]
    for i in range(n):
        for token, members in enumerate(groups[i]):
            assert sorted(p for p in range(num_tokens - 1) if source[i, p] == token) == sorted(members)
            assert sizes[i, token] == len(members) + (token == 0)


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_proportional_attention_adds_log_size_to_every_key(towers, impl):
    attention = clip_vision_parts(towers[impl]).layers[1].self_attn
    torch.manual_seed(5)
    hidden = torch.randn(2, 9, 32)
    sizes = torch.randint(1, 20, (2, 9))
    with torch.no_grad():
        got = proportional_attention(attention, hidden, sizes)
        want = ref_attention(attention, hidden, sizes)
        plain = proportional_attention(attention, hidden, torch.ones_like(sizes))
        want_plain = ref_attention(attention, hidden, torch.ones_like(sizes))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.double(), want_plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_one_layer_matches_a_hand_written_tome_layer(towers, impl):
    layer = clip_vision_parts(towers[impl]).layers[0]
    torch.manual_seed(6)
    n, num_tokens, r = 2, 14, 4
    hidden = torch.randn(n, num_tokens, 32)
    sizes = torch.randint(1, 6, (n, num_tokens))
    sizes[:, 0] = 1
    source = torch.randint(1, num_tokens, (n, 30))
    with torch.no_grad():
        got = tome_layer(layer, ToMeState(hidden, sizes, source), r)
        normed = layer.layer_norm1(hidden)
        attended = hidden.double() + ref_attention(layer.self_attn, normed, sizes)
        keys = normed.double() @ layer.self_attn.k_proj.weight.double().T + layer.self_attn.k_proj.bias.double()
        metric = keys.view(n, num_tokens, 2, 16).mean(2)
        dest = ref_matching(metric, r)
        merged, want_sizes = ref_merge(attended, sizes, dest)
        want = merged + layer.mlp(layer.layer_norm2(merged.float())).double()
    torch.testing.assert_close(got.hidden.double(), want, atol=1e-4, rtol=1e-4)
    assert got.sizes.tolist() == want_sizes.tolist()
    assert got.source.tolist() == [[dest[i][t] for t in source[i].tolist()] for i in range(n)]


# ----------------------------------------------------------------------------- the tower
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_no_merges_reproduce_the_towers_own_hidden_state(towers, impl, pixels):
    model = towers[impl]
    with torch.no_grad():
        want = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = tome_vision_forward(model, pixels, (0, 0, 0))
    torch.testing.assert_close(got.features, want, atol=1e-5, rtol=1e-5)
    assert got.groups.tolist() == [list(range(NUM_PATCHES))] * 2


@pytest.mark.parametrize("budget", [30, 20, 7])
def test_the_tower_emits_the_budget_in_first_patch_order(towers, pixels, budget):
    model = towers["eager"]
    counts = tome_merge_counts(NUM_PATCHES, NUM_LAYERS - 1, budget)
    with torch.no_grad():
        state = tome_encode(model, pixels, counts)
        out = tome_vision_forward(model, pixels, counts)
    assert out.features.shape == (2, budget, 32) and out.groups.shape == (2, NUM_PATCHES)
    assert (state.sizes.sum(1) == NUM_PATCHES + 1).all() and (state.sizes[:, 0] == 1).all()
    for i in range(2):
        groups = out.groups[i].tolist()
        assert sorted(set(groups)) == list(range(budget))  # every patch in exactly one group
        first = [groups.index(j) for j in range(budget)]
        assert first == sorted(first) and first[0] == 0
        for j in range(budget):
            members = [p for p in range(NUM_PATCHES) if groups[p] == j]
            token = int(state.source[i, members[0]])
            assert all(int(state.source[i, p]) == token for p in members)
            assert len(members) == int(state.sizes[i, token])
            torch.testing.assert_close(out.features[i, j], state.hidden[i, token])
    assert group_sizes(out.groups, budget).sum(1).tolist() == [NUM_PATCHES] * 2


def test_bf16_and_wrong_counts(towers, pixels):
    model = towers["sdpa"]
    with torch.no_grad():
        half = tome_vision_forward(copy.deepcopy(model).to(torch.bfloat16), pixels.bfloat16(), (10, 8, 6))
        with pytest.raises(ValueError, match="3 layers"):
            tome_vision_forward(model, pixels, (10, 8))
        with pytest.raises(ValueError, match="0..24"):
            tome_vision_forward(model, pixels, (25, 0, 0))
    assert half.features.dtype == torch.bfloat16 and half.features.shape == (2, 25, 32)
    assert torch.isfinite(half.features.float()).all()


# ----------------------------------------------------------------------------- merge counts
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_llava_budgets_are_met_exactly_and_evenly(budget):
    counts = tome_merge_counts(576, 23, budget)
    assert len(counts) == 23
    check_counts(counts, 576, budget)
    assert max(counts) - min(counts) <= 1 and list(counts) == sorted(counts, reverse=True)
    assert tome_merge_counts(576, 23, budget + 0.4) == counts == tome_merge_counts(576, 23, budget - 0.5)


def test_playground_budgets():
    check_counts(tome_merge_counts(121, 2, 40), 121, 40)
    for budget in (27, 13):
        with pytest.raises(ScheduleError) as err:
            tome_merge_counts(121, 2, budget)
        message = str(err.value)
        assert "\n" not in message and "tome" in message and str(budget) in message and "31..121" in message
    with pytest.raises(ScheduleError, match="tome.*122.*31..121"):
        tome_merge_counts(121, 2, 122)
    assert tome_merge_counts(121, 2, 121) == (0, 0)
    assert tome_merge_counts(121, 0, 121) == ()
    for bad in (float("nan"), True, "40"):
        with pytest.raises(ScheduleError, match="tome"):
            tome_merge_counts(121, 2, bad)


def test_reachable_budgets_match_exhaustive_enumeration():
    for num_patches, num_layers in itertools.product(range(1, 11), range(0, 4)):
        reachable = reachable_by_enumeration(num_patches, num_layers)
        assert min(reachable) == math.ceil(num_patches / 2 ** num_layers)
        for budget in range(0, num_patches + 2):
            if budget in reachable:
                counts = tome_merge_counts(num_patches, num_layers, budget)
                assert len(counts) == num_layers
                check_counts(counts, num_patches, budget)
            else:
                with pytest.raises(ScheduleError, match=f"reachable {min(reachable)}..{num_patches}"):
                    tome_merge_counts(num_patches, num_layers, budget)
