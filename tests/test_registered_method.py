"""A pruning method defined in this file alone and registered here runs through every entry point
with no other file changed: ``generate`` (cached, against an uncached slow loop written here),
the profiler (tokens per layer, torch-counted FLOPs and the cache's bytes), ``--prune-method``
through ``run_llava``'s Python entry, the bench's smoke run and a training step.

The method keeps the FIRST ``k`` vision tokens of each image at every prune layer (``k`` from
the shared schedule): a rule no built-in method has, so a path that silently ran another
method's survivors fails the position checks below."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adsc_patch import PruneMethod, compat, get_method, register_method
from adsc_patch.cache import cache_nbytes
from adsc_patch.methods import unregister_method
from adsc_patch.profile import ModelShape, Workload, layer_flops, model_cost
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from tests.helpers import QUESTIONS, prompt_ids

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "keep_first_test"
LAYERS = [1, 4]
BUDGET = 12


class KeepFirst(PruneMethod):
    """Keep each image's first ``k`` tokens; records every survivor table it is asked for."""

    name = NAME

    def __init__(self):
        self.asked: list[tuple[int, tuple[int, ...]]] = []

    def keep_sets(self, num_tokens, counts, selection, grid):
        self.asked.append((num_tokens, tuple(counts)))
        return tuple(tuple(range(k)) for k in counts)


@pytest.fixture(scope="module")
def method():
    rule = register_method(KeepFirst())
    yield rule
    unregister_method(NAME)


@pytest.fixture(scope="module")
def loaded(method, tiny_deep_dir):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    model.config._attn_implementation = "eager"
    schedule = model.configure_pruning(method=NAME, prune_layers=LAYERS, vision_token_budget=BUDGET)
    return tokenizer, model, processor, schedule


def _causal(n: int, dtype) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min).triu(1)[None, None]


def _slow_last_logits(model, embeds, vision, counts):
    """Layer by layer, no cache: at prune layer ``LAYERS[s]`` only text and the first
    ``counts[s]`` vision tokens of the image go on; original position ids."""
    inner = model.model
    hidden, index = embeds, torch.arange(embeds.shape[1])
    vision_positions = torch.nonzero(vision).flatten()
    for layer_idx, layer in enumerate(inner.layers):
        if layer_idx in LAYERS:
            keep = set(vision_positions[: counts[LAYERS.index(layer_idx)]].tolist())
            survive = torch.tensor([not bool(vision[i]) or int(i) in keep for i in index])
            hidden, index = hidden[:, survive], index[survive]
        hidden = layer(hidden, attention_mask=_causal(len(index), hidden.dtype),
                       position_embeddings=inner.rotary_emb(hidden, index[None]))
    return model.lm_head(inner.norm(hidden))[0, -1]


def test_the_registered_method_is_known_everywhere_a_method_is(method):
    from adsc_patch import PRUNE_METHODS, PruningSpec

    assert NAME in PRUNE_METHODS and get_method(NAME) is method
    assert PruningSpec(NAME, budget=BUDGET).method == NAME
    assert get_method(NAME).default_layers(32) == (2, 6, 12, 20)  # the interface's default: ADSC's


def test_cached_generation_equals_the_uncached_slow_loop_logit_for_logit(loaded, random_images):
    tokenizer, model, processor, schedule = loaded
    counts = list(schedule.stage_tokens[1:])
    assert counts[0] > counts[1] > 0
    prompt = prompt_ids(tokenizer, QUESTIONS[0])
    pixels = process_images(random_images[:1], processor, model.config)
    steps = 4
    with torch.no_grad():
        out = model.generate(prompt[None], images=pixels, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
        spliced = model.prepare_inputs_labels_for_multimodal(prompt[None], None, None, pixels)
        vision = spliced.vision_mask[0]
        first = int(torch.nonzero(vision)[0])
        trace = model.pruning_trace
        for stage, k in enumerate(counts, start=1):  # the rule, written here: the image's first k
            assert trace.kept_vision_positions[stage][0].tolist() == list(range(first, first + k))
        embeds = spliced.inputs_embeds
        tokens = out.sequences[0].tolist()
        for step in range(steps):
            reference = _slow_last_logits(model, embeds, torch.cat([vision, torch.zeros(step, dtype=torch.bool)]),
                                          counts)
            torch.testing.assert_close(out.logits[step][0], reference, atol=1e-4, rtol=1e-4)
            embeds = torch.cat([embeds, model.model.embed_tokens(torch.tensor([[tokens[step]]]))], dim=1)


def test_the_profiler_counts_what_the_method_runs(loaded, random_images):
    tokenizer, model, processor, _ = loaded
    shape = ModelShape.from_config(model.config, model.get_vision_tower().config)
    prompt = prompt_ids(tokenizer, QUESTIONS[1])
    pixels = process_images(random_images[:1], processor, model.config)
    steps = 3
    workload = Workload(text_tokens=len(prompt) - 1, new_tokens=steps, bytes_per_value=4)
    cost = model_cost(shape, NAME, BUDGET, workload, prune_layers=LAYERS)
    with torch.no_grad():
        out = model.generate(prompt[None], images=pixels, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, return_dict_in_generate=True)
        assert cache_nbytes(compat.output_cache(out)) == cost.kv_peak_bytes
        assert model.pruning_trace.tokens_per_layer[0].tolist() == list(cost.tokens_per_layer)
        spliced = model.prepare_inputs_labels_for_multimodal(prompt[None], None, None, pixels)
        counter = FlopCounterMode(display=False)
        with counter:
            model.model(inputs_embeds=spliced.inputs_embeds, vision_mask=spliced.vision_mask, use_cache=False)
    assert counter.get_total_flops() == sum(layer_flops(shape.decoder, n, n) for n in cost.tokens_per_layer)
    assert cost.scoring_flops == 0  # positional: nothing ranks


def test_run_llava_takes_it_as_prune_method(method, tiny_deep_dir, random_images, tmp_path, capsys):
    from llava.eval import run_llava

    image = tmp_path / "image.png"
    random_images[0].save(image)
    method.asked.clear()
    run_llava.main(["--model-path", tiny_deep_dir, "--image-file", str(image), "--query", "What is shown?",
                    "--prune-method", NAME, "--prune-layers", "1,4", "--vision-token-budget", "14",
                    "--temperature", "0", "--max_new_tokens", "3", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert method.asked and method.asked[-1][0] == 36
    counts = method.asked[-1][1]
    assert f"vision tokens entering each stage: {[36, *counts]}" in printed


def test_the_bench_smoke_run_measures_it_as_predicted(method, tmp_path):
    from llava import bench

    summary = bench.main(["--smoke", "--out", str(tmp_path), "--methods", NAME, "--budgets", "18",
                          "--batches", "1", "--repeats", "1", "--train-step"])
    rows = {row["method"]: row for row in summary["rows"]}
    assert set(rows) == {"full", NAME}
    assert rows[NAME]["measured_kv_bytes"] == rows[NAME]["predicted_kv_bytes"] < rows["full"]["measured_kv_bytes"]
    assert rows[NAME]["train_step_ms"] > 0


def test_a_training_step_fine_tunes_with_it(method, tmp_path, tiny_deep_dir, tiny_data):
    from llava.train.train import run_training

    method.asked.clear()
    out = tmp_path / "out"
    run_training([
        "--model_name_or_path", tiny_deep_dir, "--data_path", os.path.join(tiny_data, "data.json"),
        "--image_folder", tiny_data, "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--lora_r", "4", "--lora_alpha", "8",
        "--prune_method", NAME, "--prune_layers", "1,3", "--vision_token_budget", "12",
        "--use_cpu", "True", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
    ])
    assert method.asked, "the training forward never asked the method for its survivors"
    saved = json.loads((out / "config.json").read_text())
    assert saved["prune_method"] == NAME and saved["prune_layers"] == [1, 3]
