"""Every method on a LLaVA-1.5-7B-shaped model (built on the meta device: no weights): the
budgets 192 / 128 / 64 of 576 are met within one token, or refused naming the method, the
request and the reachable range; every refusal leaves the configuration as it was."""

import pytest
import torch
from transformers import CLIPVisionConfig

from adsc_patch import PRUNE_METHODS, ScheduleError
from llava.model import LlavaConfig, LlavaLlamaForCausalLM


@pytest.fixture(scope="module")
def llava_7b_shape():
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)  # CLIP ViT-L/14 at 336 px: 24 x 24 patches
    config = LlavaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000, mm_vision_tower="openai/clip-vit-large-patch14-336",
                         mm_vision_config=vision.to_dict(), mm_hidden_size=1024, mm_projector_type="mlp2x_gelu")
    with torch.device("meta"):
        return LlavaLlamaForCausalLM(config)


@pytest.mark.parametrize("method", PRUNE_METHODS)
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_every_method_meets_the_papers_budgets_within_one_token(llava_7b_shape, method, budget):
    schedule = llava_7b_shape.configure_pruning(method=method, vision_token_budget=budget)
    assert abs(schedule.average_tokens - budget) <= 1
    assert abs(sum(schedule.tokens_per_layer) / 32 - budget) <= 1
    expected_layers = {"fastv": (2,), "adsc": (2, 6, 12, 20), "pdrop": (2, 6, 12, 20),
                       "pdrop_original_ids": (2, 6, 12, 20)}.get(method, (0,))
    assert schedule.prune_layers == expected_layers
    if method in ("tome", "visionzip", "pool", "visionzip_spread"):  # reduced before the decoder: the same count in every layer
        assert set(schedule.tokens_per_layer) == {schedule.stage_tokens[-1]}
        assert llava_7b_shape.config.prune_layers == [] and llava_7b_shape.config.vision_token_budget == budget
    assert llava_7b_shape.config.prune_method == method


def test_pyramiddrops_published_layers_reach_192_and_refuse_128_and_64_with_the_range(llava_7b_shape):
    published = llava_7b_shape.configure_pruning(method="pdrop", prune_layers=[8, 16, 24], drop_ratio=0.5)
    assert published.stage_tokens == (576, 288, 144, 72) and published.average_tokens == 270
    assert abs(llava_7b_shape.configure_pruning(vision_token_budget=192).average_tokens - 192) <= 1
    for budget in (128, 64):
        refusal = (rf"^prune method pdrop: vision token budget {budget} is below what prune layers \[8, 16, 24\] "
                   r"allow .*reachable averages 164\.50\.\.576")
        with pytest.raises(ScheduleError, match=refusal):
            llava_7b_shape.configure_pruning(vision_token_budget=budget)
    assert llava_7b_shape.config.prune_layers == [8, 16, 24]  # the refused requests changed nothing


@pytest.mark.parametrize("method, budget, message", [
    ("tome", 0.4, r"prune method tome: .*reachable 1\.\.576"),
    ("visionzip", 1, r"prune method visionzip: .*reachable 2\.\.576"),
    ("pool", 600, r"prune method pool: .*reachable 1\.\.576"),
    ("fastv", 20, r"prune method fastv: .*below what prune layers \[2\] allow.*reachable averages 36\.94\.\.576"),
])
def test_unreachable_budgets_are_refused_naming_method_request_and_range(llava_7b_shape, method, budget, message):
    llava_7b_shape.configure_pruning(method="adsc", vision_token_budget=192)
    with pytest.raises(ScheduleError, match=message):
        llava_7b_shape.configure_pruning(method=method, vision_token_budget=budget)
    assert llava_7b_shape.config.prune_method == "adsc" and llava_7b_shape.config.vision_token_budget == 192


def test_methods_that_act_before_the_decoder_take_no_prune_layers_and_unknown_ones_list_the_known(llava_7b_shape):
    with pytest.raises(ScheduleError, match=r"prune method pool reduces the image's tokens before the language "
                                            r"model; it takes no prune layers \(got \[2, 6\]\)"):
        llava_7b_shape.configure_pruning(method="pool", prune_layers=[2, 6], vision_token_budget=64)
    with pytest.raises(ScheduleError, match="unknown prune method 'sparsevlm'; known: adsc, fastv, pdrop, tome, "
                                            "visionzip, pool"):
        llava_7b_shape.configure_pruning(method="sparsevlm", vision_token_budget=64)
