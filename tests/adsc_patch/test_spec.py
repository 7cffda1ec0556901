"""``PruningSpec``: validation in one line, every saved format read (kept sample files in
tests/data/saved_pruning, written as earlier releases wrote them), its own format round-trips,
and a spec drives the model as the keyword request it stands for."""

import json
import os

import pytest
import torch

from adsc_patch import PruningSpec, ScheduleError
from llava.model.builder import load_pretrained_model
from llava.mm_utils import process_images
from tests.helpers import QUESTIONS, prompt_ids

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "saved_pruning")


def _sample(name: str) -> dict:
    with open(os.path.join(SAMPLES, name)) as f:
        data = json.load(f)
    data.pop("_comment", None)
    return data


# what each kept file means, written here
EXPECTED = {
    "checkpoint_config_adsc_1of9.json": PruningSpec("adsc", budget=13.444444444444445, layers=(1, 4)),
    "checkpoint_config_pool_1of9.json": PruningSpec("pool", budget=14, layers=()),
    "checkpoint_config_unpruned.json": PruningSpec.off(),
    "answers_adsc.settings.json": PruningSpec("adsc", budget=40.333333333333336, layers=(1, 4)),
    "answers_fastv.settings.json": PruningSpec("fastv", budget=13.444444, layers=(1,)),
    "answers_unpruned.settings.json": PruningSpec.off(),
    "playground_schedule_pdrop.json": PruningSpec("pdrop", budget=13.444444, layers=(1, 4)),
    "playground_schedule_tome.json": PruningSpec("tome", budget=40.333333, layers=()),
    "playground_schedule_training_free.json": PruningSpec("adsc", budget=40.333333, layers=(1, 4)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_saved_format_reads_into_the_spec_it_means(name):
    data = _sample(name)
    if name.startswith("checkpoint_config"):
        spec = PruningSpec.from_config(data)
    elif name.startswith("answers"):
        spec = PruningSpec.read(data["pruning"])
    else:
        spec = PruningSpec.read(data)
    assert spec == EXPECTED[name]
    assert PruningSpec.read(spec.to_dict()) == spec  # its own format round-trips
    assert PruningSpec.from_config(spec.config_fields()) == spec  # and the config.json form


def test_assorted_specs_round_trip_through_json():
    for spec in (PruningSpec("pdrop", budget_fraction=0.25), PruningSpec("fastv", drop_ratio=0.5, layers=(2,)),
                 PruningSpec("adsc", budget=192, layers=(2, 6, 12, 20), selection="uniform_1d"),
                 PruningSpec("visionzip_spread", budget=64)):
        assert PruningSpec.read(json.loads(json.dumps(spec.to_dict()))) == spec
    assert PruningSpec("pdrop", budget_fraction=0.25).to_dict() == {
        "method": "pdrop", "budget_fraction": 0.25, "selection": "uniform_2d"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="fastvv", budget=10), "unknown prune method 'fastvv'"),
    (dict(budget=10, drop_ratio=0.5), "exactly one of budget, budget_fraction, drop_ratio (got budget, drop_ratio)"),
    (dict(), "exactly one of budget, budget_fraction, drop_ratio (got none)"),
    (dict(budget=-3), "vision token budget -3 must be positive"),
    (dict(budget=float("nan")), "pruning budget nan is not a finite number"),
    (dict(budget_fraction=1.5), "budget_fraction 1.5 must be in (0, 1]"),
    (dict(drop_ratio=1.0), "drop_ratio 1 must be in [0, 1)"),
    (dict(budget=10, layers=(4, 1)), "prune layers [4, 1]: expected distinct, increasing layer indices >= 0"),
    (dict(budget=10, layers=(1, 1)), "expected distinct, increasing"),
    (dict(budget=10, layers="1,4"), "expected decoder layer indices"),
    (dict(method="pool", budget=10, layers=(1,)), "prune method pool reduces the image's tokens before"),
    (dict(budget=10, layers=()), "prune method adsc needs at least one prune layer to meet a budget"),
    (dict(budget=10, selection="diagonal"), "prune selection 'diagonal'"),
])
def test_a_bad_spec_is_refused_in_one_line_naming_the_problem(kwargs, message):
    with pytest.raises(ScheduleError) as info:
        PruningSpec(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_reading_refuses_unknown_fields_and_meaning():
    with pytest.raises(ScheduleError, match="unknown fields: budgett"):
        PruningSpec.read({"method": "adsc", "budgett": 3})
    assert PruningSpec.read(None) == PruningSpec.off() == PruningSpec.read({})
    assert not PruningSpec.off().enabled and PruningSpec("pool", budget=9).enabled
    assert PruningSpec("adsc", budget_fraction=0.25).budget_for(576) == 144.0
    assert PruningSpec("adsc", budget=64).budget_for(576) == 64.0


@pytest.fixture(scope="module")
def model(tiny_deep_dir):
    return load_pretrained_model(tiny_deep_dir, device="cpu")


def test_a_spec_configures_the_model_as_the_keywords_it_stands_for(model):
    _, llava, _, _ = model
    try:
        # 36 vision tokens: a third is a budget of 12
        by_spec = llava.configure_pruning(PruningSpec("pdrop", budget_fraction=1 / 3, layers=(1, 4)))
        assert (llava.config.prune_method, llava.config.prune_layers) == ("pdrop", [1, 4])
        assert llava.config.vision_token_budget == pytest.approx(12.0)
        by_keywords = llava.configure_pruning(prune_layers=[1, 4], vision_token_budget=12, method="pdrop")
        assert by_spec.stage_tokens == by_keywords.stage_tokens
        llava.configure_pruning(PruningSpec.off())
        assert llava.config.prune_layers == [] and llava.config.drop_ratio == 0
        with pytest.raises(ScheduleError, match="takes no options"):
            llava.configure_pruning(PruningSpec("adsc", budget=12, options=(("alpha", 1),)))
    finally:
        llava.configure_pruning(prune_layers=[], drop_ratio=0.0, method="adsc")


def test_generate_with_a_spec_equals_the_uncached_forward_under_that_setting(model, random_images):
    """Per step, the logits of ``generate(pruning=spec)`` against an uncached forward with the
    same request stored on the config (the keyword path, no cache, no per-call override)."""
    tokenizer, llava, processor, _ = model
    spec = PruningSpec("adsc", budget_fraction=1 / 3, layers=(2, 5))
    prompt = prompt_ids(tokenizer, QUESTIONS[0])
    pixels = process_images(random_images[:1], processor, llava.config)
    with torch.no_grad():
        out = llava.generate(prompt[None], images=pixels, pruning=spec, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert llava.config.prune_layers == []  # the call did not touch the config
    tokens = out.sequences[0].tolist()
    llava.configure_pruning(prune_layers=[2, 5], vision_token_budget=12)
    try:
        for step in range(len(tokens)):
            sequence = torch.cat([prompt, torch.tensor(tokens[:step], dtype=torch.long)])[None]
            with torch.no_grad():
                expected = llava(input_ids=sequence, images=pixels, use_cache=False).logits[0, -1]
            torch.testing.assert_close(out.logits[step][0], expected, atol=1e-4, rtol=1e-4)
    finally:
        llava.configure_pruning(prune_layers=[], drop_ratio=0.0)


def _flags(*argv):
    import argparse

    from adsc_patch.spec import add_spec_flags

    parser = argparse.ArgumentParser()
    add_spec_flags(parser)
    return parser.parse_args(list(argv))


SAVED = PruningSpec("adsc", budget=13.4, layers=(1, 4))  # a fine-tuned checkpoint's own


@pytest.mark.parametrize("argv, expected", [
    ((), None),  # no flag: the checkpoint's own stays
    (("--vision-token-budget", "40"), PruningSpec("adsc", budget=40, layers=(1, 4))),
    (("--budget-fraction", "0.25"), PruningSpec("adsc", budget_fraction=0.25, layers=(1, 4))),
    (("--drop-ratio", "0.5"), PruningSpec("adsc", drop_ratio=0.5, layers=(1, 4))),
    (("--prune-layers", "2,6"), PruningSpec("adsc", budget=13.4, layers=(2, 6))),  # the saved budget, new layers
    (("--prune-method", "pdrop"), PruningSpec("pdrop", budget=13.4)),  # its own layers: the model resolves them
    (("--prune-method", "pool", "--vision-token-budget", "9"), PruningSpec("pool", budget=9)),
    (("--prune-selection", "random"), PruningSpec("adsc", budget=13.4, layers=(1, 4), selection="random")),
    (("--no-pruning",), PruningSpec("adsc", drop_ratio=0.0, layers=())),
])
def test_flags_make_a_request_on_top_of_the_checkpoints_own(argv, expected):
    from adsc_patch.spec import spec_from_flags

    assert spec_from_flags(_flags(*argv), SAVED) == expected


def test_flags_on_an_unpruned_checkpoint_and_refusals():
    from adsc_patch.spec import spec_from_flags

    off = PruningSpec.from_config({"prune_layers": [], "drop_ratio": 0.0})
    assert spec_from_flags(_flags("--vision-token-budget", "12"), off) == PruningSpec("adsc", budget=12)
    assert spec_from_flags(_flags("--prune-layers", "2,5"), off) == PruningSpec("adsc", drop_ratio=0.0,
                                                                                layers=(2, 5))
    pool = PruningSpec("pool", budget=14, layers=())
    assert spec_from_flags(_flags("--no-pruning"), pool) == PruningSpec("pool", drop_ratio=0.0, layers=())
    with pytest.raises(ScheduleError, match="--no-pruning runs on all vision tokens and cannot be combined with "
                                            "--prune-layers, --vision-token-budget"):
        spec_from_flags(_flags("--no-pruning", "--prune-layers", "1", "--vision-token-budget", "9"), SAVED)
    with pytest.raises(ScheduleError, match="prune method pool reduces the image's tokens before"):
        spec_from_flags(_flags("--prune-method", "pool", "--prune-layers", "1"), SAVED)
    with pytest.raises(SystemExit):  # argparse: one unit only
        _flags("--vision-token-budget", "9", "--budget-fraction", "0.5")


def test_budget_fraction_through_run_llava_is_the_budget_of_the_images_tokens(tiny_deep_dir, tmp_path, caplog):
    import logging

    import numpy as np
    from PIL import Image

    from llava.eval import run_llava

    image = tmp_path / "img.png"
    Image.fromarray((np.random.RandomState(1).rand(48, 48, 3) * 255).astype("uint8")).save(image)
    common = ["--model-path", tiny_deep_dir, "--image-file", str(image), "--query", "What?", "--max_new_tokens", "2",
              "--prune-layers", "2,5"]
    with caplog.at_level(logging.INFO, logger="llava.eval.pruning_args"):
        by_fraction = run_llava.main([*common, "--budget-fraction", str(1 / 3)])
        fraction_line = [r.getMessage() for r in caplog.records if "vision tokens (prune method" in r.getMessage()]
        caplog.clear()
        by_budget = run_llava.main([*common, "--vision-token-budget", "12"])  # a third of 36 tokens
        budget_line = [r.getMessage() for r in caplog.records if "vision tokens (prune method" in r.getMessage()]
    assert by_fraction == by_budget and fraction_line == budget_line and len(fraction_line) == 1
