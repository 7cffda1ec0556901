"""The analytic profile against what really runs: matmul FLOPs counted by torch's
``FlopCounterMode`` (decoder, tower, projector, the score rows), per-layer tokens against the
trace, KV bytes against the cache's tensors, for every method; the CLI and Table IV."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adsc_patch import PRUNE_METHODS, compat
from adsc_patch.cache import cache_nbytes
from adsc_patch.profile import (
    PRESETS,
    ModelShape,
    Workload,
    layer_flops,
    main,
    model_cost,
    projector_flops,
    tower_flops,
)
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from tests.helpers import QUESTIONS, prompt_ids

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]

BUDGETS = {"adsc": 12, "fastv": 12, "pdrop": 12, "tome": 20, "visionzip": 20, "pool": 20,
           "pdrop_original_ids": 12, "visionzip_spread": 20}


@pytest.fixture(scope="module")
def eager(tiny_deep_dir):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    model.config._attn_implementation = "eager"
    model.get_vision_tower().vision_tower.config._attn_implementation = "eager"
    return tokenizer, model, processor


def _shape(model) -> ModelShape:
    return ModelShape.from_config(model.config, model.get_vision_tower().config)


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_one_decoder_layer_tower_and_projector_count_what_runs(eager, random_images):
    _, model, processor = eager
    shape = _shape(model)
    hidden = torch.randn(1, 50, model.config.hidden_size)
    inner = model.model
    mask = torch.full((50, 50), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    rope = inner.rotary_emb(hidden, torch.arange(50)[None])
    assert _counted(lambda: inner.layers[0](hidden, attention_mask=mask, position_embeddings=rope)) == \
        layer_flops(shape.decoder, 50, 50)
    pixels = process_images(random_images[:1], processor, model.config)
    tower = model.get_vision_tower()
    n = shape.tower.num_patches
    # layers up to the selected hidden state (-2: all but the last) run, each on CLS + every patch
    assert shape.tower.layers_to_feature == shape.tower.num_layers - 1
    assert _counted(lambda: tower(pixels)) == tower_flops(shape.tower, [n + 1] * (shape.tower.num_layers - 1))
    features = torch.randn(1, n, shape.tower.hidden_size)
    assert _counted(lambda: model.model.mm_projector(features)) == projector_flops(shape.projector, n)


@pytest.mark.parametrize("method", [None, *PRUNE_METHODS])
def test_profile_matches_the_trace_the_cache_and_the_counted_flops_of_every_method(eager, random_images, method):
    tokenizer, model, processor = eager
    budget = BUDGETS.get(method)
    if method is None:
        model.configure_pruning(method="adsc", prune_layers=[], drop_ratio=0.0)
    else:
        model.configure_pruning(method=method, vision_token_budget=budget)
    prompt = prompt_ids(tokenizer, QUESTIONS[1])
    pixels = process_images(random_images[:1], processor, model.config)
    steps = 4
    workload = Workload(text_tokens=len(prompt) - 1, new_tokens=steps, bytes_per_value=4)
    cost = model_cost(_shape(model), method, budget, workload)
    try:
        with torch.no_grad():
            out = model.generate(prompt[None], images=pixels, max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, return_dict_in_generate=True)
            assert cache_nbytes(compat.output_cache(out)) == cost.kv_peak_bytes
            spliced = model.prepare_inputs_labels_for_multimodal(prompt[None], None, None, pixels)
            counted = _counted(lambda: model.model(inputs_embeds=spliced.inputs_embeds,
                                                   vision_mask=spliced.vision_mask, use_cache=False))
        if method is not None:
            assert model.pruning_trace.tokens_per_layer[0].tolist() == list(cost.tokens_per_layer)
        in_decoder = sum(layer_flops(_shape(model).decoder, n, n) for n in cost.tokens_per_layer)
        assert counted == in_decoder + cost.scoring_flops, (method, counted - in_decoder, cost.scoring_flops)
        assert (cost.scoring_flops > 0) == (method in ("fastv", "pdrop", "pdrop_original_ids"))
    finally:
        model.configure_pruning(method="adsc", prune_layers=[], drop_ratio=0.0)


def test_a_checkpoint_folder_gives_the_same_shape_as_its_model(eager, tiny_deep_dir):
    from adsc_patch.profile import load_shape

    assert load_shape(tiny_deep_dir) == _shape(eager[1])


def test_the_default_workload_reproduces_table_iv_within_one_point():
    shape, full = PRESETS["llava-1.5-7b"], None
    full = model_cost(shape, None, None)
    table_iv = {192: (46.3, 43.3), 128: (37.7, 34.7), 64: (29.0, 26.2)}  # FLOPs %, KV % of full
    for budget, (flops, kv) in table_iv.items():
        cost = model_cost(shape, "adsc", budget)
        assert abs(100 * cost.flops_total / full.flops_total - flops) <= 1
        assert abs(100 * cost.kv_peak_bytes / full.kv_peak_bytes - kv) <= 1


def test_the_cli_prints_one_json_object_per_method_and_budget(capsys):
    rows = main(["--model", "llava-1.5-7b", "--method", "adsc,tome", "--budgets", "192,64", "--json",
                 "--gpu-memory-gb", "80"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(rows))
    assert [(r["method"], r["budget"]) for r in printed] == [("full", None), ("adsc", 192), ("adsc", 64),
                                                             ("tome", 192), ("tome", 64)]
    for row in printed:
        assert {"method", "budget", "mean_vision_tokens", "flops_total", "flops_relative", "kv_peak_bytes",
                "kv_relative", "workload"} <= set(row)
    assert printed[0]["flops_relative"] == 100 and printed[1]["flops_relative"] < 50
    assert printed[3]["flops"]["vision_tower"] < printed[1]["flops"]["vision_tower"]  # ToMe shrinks the tower
    assert printed[1]["serving"]["max_sequences"] > printed[0]["serving"]["max_sequences"]
    main(["--method", "adsc"])
    assert "Workload: 60 text tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--method", "pdrop", "--prune-layers", "8,16,24", "--budgets", "64"])
    assert "prune method pdrop" in capsys.readouterr().err


def test_a_checkpoints_recorded_schedule_is_the_profilers_default_and_unreachable_budgets_do_not_hide_the_rest(
        tiny_deep_dir, tmp_path, capsys):
    """A checkpoint fine-tuned with ADSC at layers [1, 4] (8 layers, 36 vision tokens): its method
    and layers are the defaults (FastV takes the first, 1); an unreachable budget is one error line
    after every reachable row."""
    import json
    import shutil

    from adsc_patch.schedule import default_prune_layers, solve_drop_ratio

    folder = tmp_path / "fine-tuned"
    shutil.copytree(tiny_deep_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(prune_method="adsc", prune_layers=[1, 4], vision_token_budget=12.0)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(folder), "--budgets", "12,2", "--json"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [(r["method"], r["budget"]) for r in rows] == [("full", None), ("adsc", 12.0)]
    at_recorded = solve_drop_ratio(8, 36, (1, 4), 12).stage_tokens[-1]
    at_defaults = solve_drop_ratio(8, 36, default_prune_layers(8), 12).stage_tokens[-1]
    assert rows[1]["kept_after_last_stage"] == at_recorded != at_defaults
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("error: adsc at 2: ")]
    assert len(err.splitlines()) == 1
    main(["--model", str(folder), "--method", "fastv", "--budgets", "30", "--json"])
    (fastv,) = json.loads(capsys.readouterr().out)[1:]
    assert fastv["kept_after_last_stage"] == solve_drop_ratio(8, 36, (1,), 30).stage_tokens[-1]
