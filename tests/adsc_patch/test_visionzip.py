"""VisionZip against independent references: transformers' eager attention weights, the keys
the model's own ``k_proj`` emits during its forward, and slow per-patch loops of the released
rule (dvlab-research/VisionZip's ``clip_encoder.py``, read at 3151f6d) and of our variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from adsc_patch.compat import clip_vision_parts
from adsc_patch.reduction import group_sizes
from adsc_patch.schedule import ScheduleError
from adsc_patch.select import spread_indices
from adsc_patch.visionzip import (
    RELEASED,
    SPREAD,
    cls_attention,
    layer_keys,
    visionzip_select,
    visionzip_split,
    visionzip_vision_forward,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_LAYERS = 3
SIDE = 7  # 28 / 4
NUM_PATCHES = SIDE * SIDE
DOMINANT, CONTEXTUAL = 12, 6


def _config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=28, patch_size=4, hidden_size=32, intermediate_size=64,
        num_attention_heads=2, num_hidden_layers=NUM_LAYERS,
    )


@pytest.fixture(scope="module")
def eager_model():
    torch.manual_seed(0)
    model = CLIPVisionModel._from_config(_config(), attn_implementation="eager").eval()
    with torch.no_grad():  # sharper attention than the near-uniform default init: clear rankings
        for layer in clip_vision_parts(model).layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def sdpa_model(eager_model):
    model = CLIPVisionModel._from_config(_config(), attn_implementation="sdpa").eval()
    model.load_state_dict(eager_model.state_dict())
    return model


@pytest.fixture(scope="module")
def pixels():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 28, 28, generator=generator)


@pytest.fixture(scope="module")
def reference(eager_model, pixels):
    """The eager forward's hidden states and attentions, and every layer's keys as its own
    ``k_proj`` emitted them during that forward (mean over heads)."""
    captured = {}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(
            lambda module, args, out, index=index: captured.__setitem__(index, out)
        )
        for index, layer in enumerate(clip_vision_parts(eager_model).layers)
    ]
    try:
        with torch.no_grad():
            out = eager_model(pixels, output_hidden_states=True, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    heads, head_dim = 2, 16
    keys = {i: k.view(k.shape[0], k.shape[1], heads, head_dim).mean(2) for i, k in captured.items()}
    return {"hidden": out.hidden_states, "attn": out.attentions, "keys": keys}


def slow_visionzip(features, scores, keys, dominant, contextual):
    """One image at a time, one patch at a time: the rule as the module docstring states it."""
    tokens_all, groups_all = [], []
    for feat, score, key in zip(features, scores, keys):
        n = feat.shape[0]
        order = sorted(range(n), key=lambda p: (-float(score[p]), p))
        kept = sorted(order[:dominant])
        rest = [p for p in range(n) if p not in kept]
        targets = [rest[j] for j in spread_indices(len(rest), contextual)] if contextual else []
        members = {t: [t] for t in targets}
        groups = [-1] * n
        for p in rest:
            if p in members or not targets:
                continue
            sims = [float(F.cosine_similarity(key[p], key[t], dim=0)) for t in targets]
            best = max(range(len(targets)), key=lambda j: (sims[j], -j))
            ranked = sorted(sims, reverse=True)
            assert len(ranked) == 1 or ranked[0] - ranked[1] > 1e-5, "near tie: reference would be fragile"
            members[targets[best]].append(p)
        tokens = [feat[p] for p in kept]
        for j, p in enumerate(kept):
            groups[p] = j
        for j, t in enumerate(targets):
            tokens.append(torch.stack([feat[p] for p in members[t]]).mean(0))
            for p in members[t]:
                groups[p] = dominant + j
        tokens_all.append(torch.stack(tokens))
        groups_all.append(torch.tensor(groups))
    return torch.stack(tokens_all), torch.stack(groups_all)


def released_visionzip(hidden, scores, keys, dominant, contextual):
    """The release's rule by hand, one image and one patch at a time: CLS plus the
    ``dominant - 1`` patches CLS attends to most (raster order), then of the remaining patches
    targets at a stride ``max(1, R // contextual)`` from the first; every other patch joins its
    most cosine-similar target; a contextual token is its target + the mean of those that joined.
    ``hidden`` ``(n, 1 + N, D)`` holds CLS first."""
    tokens_all, groups_all = [], []
    for feat_all, score, key in zip(hidden, scores, keys):
        cls, feat = feat_all[0], feat_all[1:]
        n = feat.shape[0]
        order = sorted(range(n), key=lambda p: (-float(score[p]), p))
        kept = sorted(order[:dominant - 1])
        rest = [p for p in range(n) if p not in kept]
        step = max(1, len(rest) // contextual) if contextual else 1
        targets = rest[::step][:contextual]
        joined = {t: [] for t in targets}
        groups = [-1] * n
        for p in rest:
            if p in joined or not targets:
                continue
            sims = [float(F.cosine_similarity(key[p], key[t], dim=0)) for t in targets]
            best = max(range(len(targets)), key=lambda j: (sims[j], -j))
            ranked = sorted(sims, reverse=True)
            assert len(ranked) == 1 or ranked[0] - ranked[1] > 1e-5, "near tie: reference would be fragile"
            joined[targets[best]].append(p)
        tokens = [cls] + [feat[p] for p in kept]
        for j, p in enumerate(kept):
            groups[p] = 1 + j
        for j, t in enumerate(targets):
            extra = torch.stack([feat[p] for p in joined[t]]).mean(0) if joined[t] else torch.zeros_like(feat[t])
            tokens.append(feat[t] + extra)
            for p in [t, *joined[t]]:
                groups[p] = dominant + j
        tokens_all.append(torch.stack(tokens))
        groups_all.append(torch.tensor(groups))
    return torch.stack(tokens_all), torch.stack(groups_all)


def _scored_layer_reference(reference, select_layer):
    index = select_layer % (NUM_LAYERS + 1)
    attn = reference["attn"][index - 1][:, :, 0, 1:].mean(1)
    keys = reference["keys"][index - 1][:, 1:]
    return reference["hidden"][index][:, 1:], attn, keys


def _assert_clear_ranking(scores, k):
    top = scores.sort(dim=1, descending=True).values
    assert (top[:, k - 1] - top[:, k]).min() > 1e-4, "boundary of the top-k is a near tie"


# ------------------------------------------------------------------------------ split
@pytest.mark.parametrize("budget, split", [(192, (162, 30)), (128, (108, 20)), (64, (54, 10))])
def test_published_splits(budget, split):
    assert visionzip_split(budget, 576) == split


def test_split_rounds_float_budgets_and_spans_the_range():
    assert visionzip_split(191.6, 576) == (162, 30)
    assert visionzip_split(127.6, 576) == (108, 20)
    assert visionzip_split(128.4, 576) == (108, 20)
    assert visionzip_split(2, 576) == (2, 0)
    assert visionzip_split(576, 576) == (486, 90)
    for budget in range(2, 577):
        dominant, contextual = visionzip_split(budget, 576)
        assert dominant + contextual == budget and contextual == math.floor(budget * 5 / 32 + 0.5)


@pytest.mark.parametrize("budget", [1, 0, -3, 1.5, 577, 600.0, float("nan"), "64", True])
def test_split_errors_name_the_method_and_range(budget):
    with pytest.raises(ScheduleError) as info:
        visionzip_split(budget, 576)
    message = str(info.value)
    assert message.startswith("prune method visionzip:") and "\n" not in message
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and not math.isnan(budget):
        assert str(budget) in message and "2..576" in message


# ------------------------------------------------------------------ scores and keys
@pytest.mark.parametrize("layer_index", range(NUM_LAYERS))
def test_cls_attention_matches_eager_attentions(eager_model, reference, layer_index):
    layer = clip_vision_parts(eager_model).layers[layer_index]
    with torch.no_grad():
        ours = cls_attention(layer, reference["hidden"][layer_index])
    expected = reference["attn"][layer_index][:, :, 0, 1:].mean(1)
    assert ours.shape == (2, NUM_PATCHES)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer_index", range(NUM_LAYERS))
def test_layer_keys_match_the_models_own_projection(eager_model, reference, layer_index):
    layer = clip_vision_parts(eager_model).layers[layer_index]
    with torch.no_grad():
        ours = layer_keys(layer, reference["hidden"][layer_index])
    assert ours.shape == (2, NUM_PATCHES + 1, 16)
    torch.testing.assert_close(ours, reference["keys"][layer_index], atol=1e-5, rtol=0)


# ------------------------------------------------------------------- the full rule
def _reference_of(rule, reference, select_layer, dominant, contextual):
    features, scores, keys = _scored_layer_reference(reference, select_layer)
    if rule is RELEASED:
        hidden = reference["hidden"][select_layer % (NUM_LAYERS + 1)]
        return released_visionzip(hidden, scores, keys, dominant, contextual)
    return slow_visionzip(features, scores, keys, dominant, contextual)


@pytest.mark.parametrize("model_name", ["eager_model", "sdpa_model"])
def test_the_default_is_the_released_rule_and_the_variant_is_not(request, model_name, reference, pixels):
    model = request.getfixturevalue(model_name)
    _, scores, _ = _scored_layer_reference(reference, -2)
    _assert_clear_ranking(scores, DOMINANT - 1)
    with torch.no_grad():
        default = visionzip_vision_forward(model, pixels, DOMINANT, CONTEXTUAL)
        spread = visionzip_vision_forward(model, pixels, DOMINANT, CONTEXTUAL, rule=SPREAD)
    released_tokens, released_groups = _reference_of(RELEASED, reference, -2, DOMINANT, CONTEXTUAL)
    assert torch.equal(default.groups, released_groups)
    torch.testing.assert_close(default.features, released_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(default.features[:, 0], reference["hidden"][-2][:, 0], atol=1e-5, rtol=0)  # CLS
    # negative controls: each convention misses the other's reference
    spread_tokens, spread_groups = _reference_of(SPREAD, reference, -2, DOMINANT, CONTEXTUAL)
    assert not torch.equal(default.groups, spread_groups)
    assert not torch.allclose(default.features, spread_tokens, atol=1e-3)
    assert not torch.equal(spread.groups, released_groups)
    assert not torch.allclose(spread.features, released_tokens, atol=1e-3)


@pytest.mark.parametrize("rule", [RELEASED, SPREAD], ids=["released", "spread"])
@pytest.mark.parametrize("model_name", ["eager_model", "sdpa_model"])
def test_vision_forward_matches_slow_reference(request, model_name, reference, pixels, rule):
    model = request.getfixturevalue(model_name)
    implementation = model.config._attn_implementation
    features, scores, keys = _scored_layer_reference(reference, -2)
    _assert_clear_ranking(scores, DOMINANT - int(rule.cls_token))
    with torch.no_grad():
        reduction = visionzip_vision_forward(model, pixels, DOMINANT, CONTEXTUAL, rule=rule)
    assert model.config._attn_implementation == implementation  # never switched to eager
    assert reduction.num_tokens == DOMINANT + CONTEXTUAL
    assert reduction.features.shape == (2, DOMINANT + CONTEXTUAL, 32)

    expected_tokens, expected_groups = _reference_of(rule, reference, -2, DOMINANT, CONTEXTUAL)
    assert torch.equal(reduction.groups, expected_groups)
    torch.testing.assert_close(reduction.features, expected_tokens, atol=1e-5, rtol=0)

    # The dominant patches are the top-k of the eager reference, in raster order (after CLS when released).
    first = int(rule.cls_token)
    top = scores.topk(DOMINANT - first, dim=1).indices.sort(dim=1).values
    for image in range(2):
        owners = [int(p) for p in (reduction.groups[image] < DOMINANT).nonzero().flatten()]
        assert owners == top[image].tolist()
        torch.testing.assert_close(reduction.features[image, first:DOMINANT], features[image, top[image]],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule", [RELEASED, SPREAD], ids=["released", "spread"])
def test_select_layer_last_uses_the_last_layer(eager_model, reference, pixels, rule):
    _, scores, _ = _scored_layer_reference(reference, -1)
    _assert_clear_ranking(scores, 8 - int(rule.cls_token))
    with torch.no_grad():
        reduction = visionzip_vision_forward(eager_model, pixels, 8, 4, select_layer=-1, rule=rule)
    expected_tokens, expected_groups = _reference_of(rule, reference, -1, 8, 4)
    assert torch.equal(reduction.groups, expected_groups)
    torch.testing.assert_close(reduction.features, expected_tokens, atol=1e-5, rtol=0)


@pytest.mark.parametrize("select_layer", [0, -(NUM_LAYERS + 1), NUM_LAYERS + 1, -(NUM_LAYERS + 2)])
def test_select_layer_without_a_producing_layer_raises(eager_model, pixels, select_layer):
    with pytest.raises(ValueError, match="prune method visionzip"), torch.no_grad():
        visionzip_vision_forward(eager_model, pixels, 4, 2, select_layer=select_layer)


def test_group_structure(eager_model, pixels):
    with torch.no_grad():
        reduction = visionzip_vision_forward(eager_model, pixels, DOMINANT, CONTEXTUAL, rule=SPREAD)
    groups = reduction.groups
    sizes = group_sizes(groups, DOMINANT + CONTEXTUAL)
    assert (sizes[:, :DOMINANT] == 1).all()  # each dominant patch owns its token
    assert (sizes[:, DOMINANT:] >= 1).all()
    assert (sizes.sum(1) == NUM_PATCHES).all() and (groups >= 0).all()  # every patch lands once
    for image in range(2):
        dominant_tokens = groups[image][groups[image] < DOMINANT]
        assert dominant_tokens.tolist() == list(range(DOMINANT))  # raster order
        # Each contextual token is the mean of exactly the patches pointing at it.
        hidden = eager_model(pixels, output_hidden_states=True).hidden_states[-2][image, 1:]
        for token in range(DOMINANT + CONTEXTUAL):
            torch.testing.assert_close(
                reduction.features[image, token], hidden[groups[image] == token].mean(0), atol=1e-5, rtol=0
            )


def test_released_group_structure(eager_model, pixels):
    with torch.no_grad():
        reduction = visionzip_vision_forward(eager_model, pixels, DOMINANT, CONTEXTUAL)
        hidden = eager_model(pixels, output_hidden_states=True).hidden_states[-2]
    groups = reduction.groups
    sizes = group_sizes(groups, DOMINANT + CONTEXTUAL)
    assert (sizes[:, 0] == 0).all()  # CLS holds no patch
    assert (sizes[:, 1:DOMINANT] == 1).all() and (sizes[:, DOMINANT:] >= 1).all()
    assert (sizes.sum(1) == NUM_PATCHES).all() and (groups >= 0).all()
    for image in range(2):
        torch.testing.assert_close(reduction.features[image, 0], hidden[image, 0], atol=1e-5, rtol=0)
        patches = hidden[image, 1:]
        remaining = (groups[image] >= DOMINANT).nonzero().flatten()  # raster order
        targets = remaining[::len(remaining) // CONTEXTUAL][:CONTEXTUAL]  # the released stride
        for j, target in enumerate(targets.tolist()):  # target + mean of the patches that joined it
            token = DOMINANT + j
            assert groups[image, target] == token
            joined = [p for p in (groups[image] == token).nonzero().flatten().tolist() if p != target]
            rest = patches[joined].mean(0) if joined else torch.zeros_like(patches[0])
            torch.testing.assert_close(reduction.features[image, token], patches[target] + rest, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- synthetic inputs
def test_released_targets_step_from_the_first_remaining_patch_and_merge_as_target_plus_mean():
    features = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(1, 10, 3).contiguous()
    scores = torch.full((1, 10), 0.1)
    keys = torch.ones(1, 10, 4)  # every target equally similar: ties to the earlier target
    cls = torch.full((1, 3), -1.0)
    reduction = visionzip_select(features, scores, keys, 3, 2, RELEASED, cls_features=cls)
    # dominant: CLS + patches 0, 1; rest 2..9 (R = 8), step 8 // 2 = 4: targets 2 and 6
    assert reduction.groups[0].tolist() == [1, 2, 3, 3, 3, 3, 4, 3, 3, 3]
    torch.testing.assert_close(reduction.features[0, :, 0], torch.tensor([-1, 0, 1, 2 + (3 + 4 + 5 + 7 + 8 + 9) / 6, 6]))
    with pytest.raises(ValueError, match="CLS"):
        visionzip_select(features, scores, keys, 3, 2, RELEASED)


def test_ties_go_to_the_earlier_patch_and_the_earlier_target():
    features = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(1, 10, 3).contiguous()
    scores = torch.full((1, 10), 0.1)
    keys = torch.ones(1, 10, 4)  # every target equally similar
    reduction = visionzip_select(features, scores, keys, 3, 2, SPREAD)
    # dominant: patches 0, 1, 2; rest 3..9 (R = 7), targets at spread_indices(7, 2) = [1, 5] -> 4, 8
    assert spread_indices(7, 2) == [1, 5]
    assert reduction.groups[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 4, 3]
    torch.testing.assert_close(reduction.features[0, :, 0], torch.tensor([0, 1, 2, (3 + 4 + 5 + 6 + 7 + 9) / 6, 8]))


def test_contextual_tokens_follow_their_targets_raster_order():
    features = torch.randn(1, 8, 2)
    scores = torch.tensor([[0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0]])
    keys = torch.tensor([[[1.0, 0], [0, 1], [0, 1], [1, 0], [1, 0.1], [1, 0], [0, 1], [0.1, 1]]])
    reduction = visionzip_select(features, scores, keys, 2, 2, SPREAD)
    # dominant 1, 6; rest [0, 2, 3, 4, 5, 7]; targets spread_indices(6, 2) = [1, 4] -> patches 2, 5.
    # Patches 0, 3, 4 join target 5, patch 7 joins target 2. Token 3 holds patch 0 yet comes after
    # token 2: contextual tokens follow their targets, not their first patch.
    assert spread_indices(6, 2) == [1, 4]
    assert reduction.groups[0].tolist() == [3, 0, 2, 3, 3, 3, 1, 2]
    torch.testing.assert_close(reduction.features[0, :2], features[0, [1, 6]])
    torch.testing.assert_close(reduction.features[0, 2], features[0, [2, 7]].mean(0))
    torch.testing.assert_close(reduction.features[0, 3], features[0, [0, 3, 4, 5]].mean(0))


def test_no_contextual_tokens_drops_the_rest():
    features = torch.randn(2, 6, 3)
    scores = torch.rand(2, 6)
    keys = torch.randn(2, 6, 4)
    reduction = visionzip_select(features, scores, keys, 2, 0, SPREAD)
    assert reduction.num_tokens == 2
    assert ((reduction.groups >= 0).sum(1) == 2).all() and ((reduction.groups == -1).sum(1) == 4).all()
    # the two kept are the two highest scores, in raster order, unchanged
    expected_tokens, expected_groups = slow_visionzip(features, scores, keys, 2, 0)
    assert torch.equal(reduction.groups, expected_groups)
    torch.testing.assert_close(reduction.features, expected_tokens, rtol=0, atol=0)


def test_half_precision_keeps_dtype():
    features = torch.randn(1, 12, 4, dtype=torch.bfloat16)
    scores, keys = torch.rand(1, 12), torch.randn(1, 12, 3)
    reduction = visionzip_select(features, scores, keys, 4, 3, SPREAD)
    assert reduction.features.dtype == torch.bfloat16 and reduction.num_tokens == 7
    # the values too: the slow reference in float32, to bfloat16's precision; dominant rows exact
    expected_tokens, expected_groups = slow_visionzip(features.float(), scores, keys, 4, 3)
    assert torch.equal(reduction.groups, expected_groups)
    assert torch.equal(reduction.features[:, :4].float(), expected_tokens[:, :4])
    torch.testing.assert_close(reduction.features.float(), expected_tokens, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dominant, contextual", [(6, 1), (-1, 2), (2, -1), (0, 7)])
def test_select_errors_name_the_method(dominant, contextual):
    with pytest.raises(ScheduleError, match="prune method visionzip"):
        visionzip_select(torch.randn(1, 6, 2), torch.rand(1, 6), torch.randn(1, 6, 2), dominant, contextual, SPREAD)


def test_select_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="prune method visionzip"):
        visionzip_select(torch.randn(1, 6, 2), torch.rand(1, 5), torch.randn(1, 6, 2), 2, 1, SPREAD)
