"""The analytic profile against what really runs: matmul FLOPs counted by torch's
``FlopCounterMode`` (decoder, tower, projector, the score rows), per-layer tokens against the
trace, KV bytes against the cache's tensors, for every method; the CLI and Table IV. For the
models whose tokens follow the image size (Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision):
tokens per image against the processors' rules worked by hand, tiny random models' counted FLOPs
and caches, configs through ``load_shape``, the presets against transformers' config classes."""

import dataclasses
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


# ------------------------------------------------ models whose vision tokens follow the image size
IMAGE, VIDEO, START, END = 100, 101, 102, 103


@pytest.mark.parametrize("model, width, height, grid", [
    # Qwen2.5-VL: sides rounded to multiples of 14 x 2 = 28 px, area in [56*56, 28*28*16384] px
    ("qwen2.5-vl-7b", 1024, 768, (27, 37)),   # round(768/28) = 27, round(1024/28) = 37: 756 x 1036 px
    ("qwen2.5-vl-7b", 448, 448, (16, 16)),
    # 28 x 28 px < 56*56: scaled by sqrt(3136 / 600) = 2.286, sides ceil'ed: ceil(1.63) = 2, ceil(2.45) = 3
    ("qwen2.5-vl-7b", 30, 20, (2, 3)),
    # 4004 x 5012 px > 12845056: scaled by 1/sqrt(2e7 / 12845056) = 1/1.2478, sides floored: 114, 143
    ("qwen2.5-vl-7b", 5000, 4000, (114, 143)),
    # Qwen3-VL: multiples of 16 x 2 = 32 px, area in [256*256, 4096*4096] px
    ("qwen3-vl-8b", 1024, 768, (24, 32)),
    ("qwen3-vl-8b", 2048, 2048, (64, 64)),
    ("qwen3-vl-8b", 100, 100, (8, 8)),  # 96 x 96 px < 65536: x 2.56, ceil(256/32) = 8
])
def test_qwen_vision_tokens_per_image_follow_the_processors_resize(model, width, height, grid):
    from adsc_patch.profile import image_tokens

    shape = PRESETS[model]
    image = image_tokens(shape, width, height)
    merge, patch = 2, shape.tower.patch_size
    assert image.grids == (grid,) and image.vision_tokens == grid[0] * grid[1]
    assert image.tower_inputs == ((grid[0] * merge, grid[1] * merge),)  # 4 patches per token before the merger
    assert image.resized == (grid[0] * merge * patch, grid[1] * merge * patch) and image.newline_tokens == 0


@pytest.mark.parametrize("width, height, images, tiles, grids, newlines", [
    # best pinpoint (768, 1152) (the smallest holding all 768 x 1024 px): 2 x 3 tiles, 54 x 81 patches;
    # the image is narrower than 81/54, so cols = 81 - 2 * ((81 - round(1024 * 54 / 768)) // 2) = 73
    (1024, 768, 1, 6, ((27, 27), (54, 73)), 54),
    # (1536, 768): 4 x 2 tiles, 108 x 54; cols = 54 - 2 * ((54 - round(500 * 108 / 1500)) // 2) = 36
    (500, 1500, 1, 8, ((27, 27), (108, 36)), 108),
    (384, 384, 1, 1, ((27, 27), (27, 27)), 27),
    # 6 x 6 tiles, 162 x 162 over 9 tiles of area by sqrt(162^2 / (9 * 27^2)) = 2 > 1.1: 81 x 81
    (2304, 2304, 1, 36, ((27, 27), (81, 81)), 81),
    (1024, 768, 2, 0, ((27, 27),), 1),  # several images in a prompt: base view + one newline each
])
def test_onevision_tokens_per_image_are_the_base_view_and_the_unpadded_crops(width, height, images, tiles, grids,
                                                                            newlines):
    from adsc_patch.profile import image_tokens

    image = image_tokens(PRESETS["llava-onevision-7b"], width, height, images_in_prompt=images)
    assert image.grids == grids and image.newline_tokens == newlines
    assert image.tower_inputs == ((27, 27),) * (1 + tiles) and image.projector_tokens == 729 * (1 + tiles)


def test_qwen2_5_vl_windows_tile_the_merged_grid_from_the_top_left():
    """1024 x 768 px: 54 x 74 patches, 27 x 37 merged tokens, windows of 112 / 2 / 14 = 4 merged
    tokens a side: 6 x 9 full windows (64 patches), 6 of 4 x 1 merged tokens at the right (16),
    9 of 3 x 4 at the bottom (48), one of 3 x 1 in the corner (12)."""
    from adsc_patch.profile import attention_windows

    windows = attention_windows(PRESETS["qwen2.5-vl-7b"].tower, 54, 74)
    assert sorted(windows) == sorted([64] * 54 + [16] * 6 + [48] * 9 + [12])
    assert sum(windows) == 54 * 74 and attention_windows(PRESETS["qwen3-vl-8b"].tower, 48, 64) == ()


def test_the_decoder_part_follows_the_decoder_convention_per_image_grid():
    """Tiny Qwen-like shape, 96 x 64 px at patch 4 x merge 2: a 8 x 12 grid of 96 tokens; each
    layer's tokens are the text plus each image's own schedule at fraction x 96 (one schedule per
    image, from its own count), the prefill the decoder convention over them."""
    from adsc_patch.profile import DecoderShape, ProjectorShape, SmartResize, VisionTowerShape
    from adsc_patch.schedule import solve_drop_ratio

    decoder = DecoderShape(6, 64, 128, 4, 2, 16, 128)
    tower = VisionTowerShape(2, 32, 64, 0, 4, -1, class_tokens=0, temporal_patch_size=2, spatial_merge_size=2)
    shape = ModelShape(decoder, tower, ProjectorShape(128, 64, 2, 128), SmartResize(64, 100000))
    workload = Workload(text_tokens=10, images=2, new_tokens=3, bytes_per_value=2, image_width=96, image_height=64)
    full = model_cost(shape, None, None, workload)
    logits = 2 * 64 * 128
    assert full.tokens_per_layer == (10 + 2 * 96,) * 6
    assert full.prefill_flops == 6 * layer_flops(decoder, 202, 202) + logits
    assert full.decode_flops == sum(6 * layer_flops(decoder, 1, 202 + step) + logits for step in (1, 2))
    assert full.kv_bytes_after_prefill == 6 * 202 * 2 * 2 * 16 * 2
    pruned = model_cost(shape, "adsc", None, workload, (1, 3), budget_fraction=0.5)
    per_image = solve_drop_ratio(6, 96, (1, 3), 48).tokens_per_layer
    assert pruned.tokens_per_layer == tuple(10 + 2 * n for n in per_image)
    assert pruned.prefill_flops == sum(layer_flops(decoder, 10 + 2 * n, 10 + 2 * n) for n in per_image) + logits
    assert pruned.mean_vision_tokens == pytest.approx(sum(per_image) / 6) and pruned.budget_fraction == 0.5
    # an absolute budget on such a model is the fraction budget / the image's tokens
    assert model_cost(shape, "adsc", 48, workload, (1, 3)).tokens_per_layer == pruned.tokens_per_layer
    with pytest.raises(ValueError, match="follow each image's size"):
        model_cost(shape, None, None, Workload())
    with pytest.raises(ValueError, match="acts before the language model"):
        model_cost(shape, "tome", None, workload, budget_fraction=0.5)


def test_a_budget_fraction_on_a_fixed_size_model_is_that_fraction_of_its_tokens():
    shape = PRESETS["llava-1.5-7b"]
    by_fraction = model_cost(shape, "adsc", None, budget_fraction=1 / 3)
    assert dataclasses.replace(by_fraction, budget_fraction=None) == model_cost(shape, "adsc", 192)
    with pytest.raises(ValueError, match="exactly one of budget and budget_fraction"):
        model_cost(shape, "adsc", 192, budget_fraction=0.5)


def _qwen2_5_vl_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=None, pad_token_id=0),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           fullatt_block_indexes=[1], window_size=16),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _qwen3_vl_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         bos_token_id=None, eos_token_id=None, pad_token_id=0),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 2]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


TILE_PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 48]]


def _anyres_config(model_type):
    from transformers import LlavaNextConfig, LlavaOnevisionConfig

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=4)
    if model_type == "llava_next":
        return LlavaNextConfig(text_config=dict(model_type="llama", **text),
                               vision_config=dict(model_type="clip_vision_model", **vision),
                               image_grid_pinpoints=TILE_PINPOINTS, image_token_id=IMAGE, vision_feature_layer=-2,
                               vision_feature_select_strategy="default")
    return LlavaOnevisionConfig(text_config=dict(model_type="qwen2", **text),
                                vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **vision),
                                image_grid_pinpoints=TILE_PINPOINTS, image_token_id=IMAGE, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1")


def _tiny_model(model_type):
    """A tiny random model of ``model_type`` (eager attention) and its shape; Qwen's pixel bounds
    small enough for images of tens of pixels."""
    from transformers import (LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)

    from adsc_patch.profile import SmartResize
    from tests.helpers import eager_model

    cls, config = {"qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, _qwen2_5_vl_config),
                   "qwen3_vl": (Qwen3VLForConditionalGeneration, _qwen3_vl_config),
                   "llava_next": (LlavaNextForConditionalGeneration, lambda: _anyres_config("llava_next")),
                   "llava_onevision": (LlavaOnevisionForConditionalGeneration,
                                       lambda: _anyres_config("llava_onevision"))}[model_type]
    model = eager_model(cls, config())
    shape = ModelShape.from_config(model.config)
    if model_type.startswith("qwen"):
        shape = dataclasses.replace(shape, resolution=SmartResize(64, 100000))
    return model, shape


def _image_inputs(model, shape, width, height):
    """``(ids, model keywords)`` of a prompt with one ``width x height`` image: Qwen's patches by its
    grid, anyres tiles by transformers' own ``image_size_to_num_patches``."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from adsc_patch.profile import image_tokens

    image = image_tokens(shape, width, height)
    generator = torch.Generator().manual_seed(0)
    if model.config.model_type.startswith("qwen"):
        (rows, cols), = image.tower_inputs
        ids = torch.tensor([[5, 6, START] + [IMAGE] * image.vision_tokens + [END, 9, 10]])
        return ids, dict(pixel_values=torch.randn(rows * cols, 3 * 2 * 4 * 4, generator=generator),
                         image_grid_thw=torch.tensor([[1, rows, cols]]), mm_token_type_ids=(ids == IMAGE).int())
    tiles = image_size_to_num_patches((height, width), TILE_PINPOINTS, 16)
    ids = torch.tensor([[5, 6] + [IMAGE] * (image.vision_tokens + image.newline_tokens) + [9, 10]])
    return ids, dict(pixel_values=torch.randn(1, tiles, 3, 16, 16, generator=generator),
                     image_sizes=torch.tensor([[height, width]]))


@pytest.mark.parametrize("model_type, sizes", [
    ("qwen2_5_vl", [(90, 70), (40, 72)]),
    ("qwen3_vl", [(90, 70)]),
    ("llava_next", [(30, 20), (14, 30)]),
    ("llava_onevision", [(30, 20), (44, 40), (45, 10)]),
])
def test_a_tiny_models_counted_flops_and_kv_cache_after_prefill_equal_the_profile(model_type, sizes):
    """The whole forward (tower, merger / projector, decoder, last-position logits) counted by
    torch's ``FlopCounterMode`` and the real cache after the prefill, full and at a budget
    fraction (one schedule per image grid), equal the profile for images of several sizes
    (Qwen2.5-VL's windows partial at the edges, Qwen3-VL's DeepStack mergers, anyres crops
    unpadded and, for OneVision at ``anyres_max_1``, downscaled)."""
    from adsc_patch import PruningSpec, pruning

    model, shape = _tiny_model(model_type)
    specs = [None, PruningSpec("adsc", budget_fraction=0.5, layers=(1, 3)),
             PruningSpec("pdrop", budget_fraction=0.4, layers=(1, 3))]
    for width, height in sizes:
        ids, inputs = _image_inputs(model, shape, width, height)
        for spec in specs:
            workload = Workload(text_tokens=int((ids != IMAGE).sum()), new_tokens=1, bytes_per_value=4,
                                image_width=width, image_height=height)
            if spec is None:
                cost = model_cost(shape, None, None, workload)
                outputs = _counted_and_cached(model, ids, inputs)
            else:
                cost = model_cost(shape, spec.method, None, workload, spec.layers, budget_fraction=spec.budget_fraction)
                with pruning(model, spec):
                    outputs = _counted_and_cached(model, ids, inputs)
            counted, cached = outputs
            assert counted == cost.tower_flops + cost.projector_flops + cost.scoring_flops + cost.prefill_flops, \
                (width, height, spec)
            assert cached == cost.kv_bytes_after_prefill, (width, height, spec)
            assert (cost.scoring_flops > 0) == (spec is not None and spec.method == "pdrop")


def _counted_and_cached(model, ids, inputs) -> tuple[int, int]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **inputs)
    return counter.get_total_flops(), cache_nbytes(compat.output_cache(out))


def test_a_saved_tiny_qwen2_5_vl_config_loads_into_its_shape(tmp_path):
    """``load_shape`` of a folder holding a tiny ``Qwen2_5_VLConfig`` (and a preprocessor config
    with the pixel bounds) gives the shape written here from the config's sizes."""
    from adsc_patch.profile import DecoderShape, ProjectorShape, SmartResize, VisionTowerShape, load_shape

    _qwen2_5_vl_config().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 1024, "max_pixels": 65536}))
    expected = ModelShape(
        DecoderShape(6, 64, 128, 4, 2, 16, 128),
        VisionTowerShape(3, 32, 48, 0, 4, -1, 3, class_tokens=0, gated_mlp=True, temporal_patch_size=2,
                         spatial_merge_size=2, window_size=16, full_attention_layers=(1,)),
        ProjectorShape(4 * 32, 64, 2, hidden_features=4 * 32), SmartResize(1024, 65536))
    assert load_shape(str(tmp_path)) == expected
    (tmp_path / "preprocessor_config.json").unlink()  # without one: the checkpoint's shipped bounds
    assert load_shape(str(tmp_path / "config.json")).resolution == SmartResize(56 * 56, 28 * 28 * 16384)
    (tmp_path / "processor_config.json").write_text(json.dumps(  # the combined processor file, nested
        {"image_processor": {"size": {"shortest_edge": 2048, "longest_edge": 4096}}}))
    assert load_shape(str(tmp_path)).resolution == SmartResize(2048, 4096)


@pytest.mark.parametrize("model_type", ["qwen3_vl", "llava_next", "llava_onevision"])
def test_saved_qwen3_vl_and_anyres_configs_load_as_their_models_shape(tmp_path, model_type):
    from adsc_patch.profile import load_shape

    config = _qwen3_vl_config() if model_type == "qwen3_vl" else _anyres_config(model_type)
    config.save_pretrained(tmp_path)
    assert load_shape(str(tmp_path)) == ModelShape.from_config(config)


def test_the_presets_agree_with_transformers_config_classes_and_the_models_parameter_counts():
    """Each preset equals the shape of transformers' config class at the checkpoint's sizes (the
    vision towers at the classes' defaults where those are the checkpoint's), and its parameter
    count that of the model built from it on the meta device (within 0.1%)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration)

    from adsc_patch.profile import parameter_count

    qwen2_text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064)
    configs = {
        "qwen2.5-vl-7b": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(
            text_config=qwen2_text, vision_config=dict(hidden_size=1280, out_hidden_size=3584))),
        "qwen3-vl-8b": (Qwen3VLForConditionalGeneration, Qwen3VLConfig(
            text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936),
            vision_config=dict(out_hidden_size=4096))),
        "llava-onevision-7b": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", **qwen2_text))),
    }
    for name, (cls, config) in configs.items():
        assert ModelShape.from_config(config) == PRESETS[name], name
        with torch.device("meta"):
            model = cls(config)
        weights = sum(p.numel() for p in model.parameters())
        assert abs(parameter_count(PRESETS[name]) / weights - 1) < 1e-3, (name, parameter_count(PRESETS[name]), weights)


def test_the_cli_takes_an_image_size_and_budget_fractions(capsys):
    rows = main(["--model", "qwen2.5-vl-7b", "--image-size", "1024x768", "--budget-fractions", "0.5,0.333",
                 "--method", "adsc,fastv", "--json"])
    assert [(r["method"], r["budget"], r["budget_fraction"]) for r in rows] == [
        ("full", None, None), ("adsc", None, 0.5), ("adsc", None, 0.333), ("fastv", None, 0.5), ("fastv", None, 0.333)]
    assert all(r["image"]["vision_tokens"] == 27 * 37 and r["image"]["grids"] == [[27, 37]] for r in rows)
    assert rows[0]["mean_vision_tokens"] == 999 and abs(rows[1]["mean_vision_tokens"] - 499.5) < 1
    assert rows[0]["workload"]["image_width"] == 1024 and rows[0]["workload"]["image_height"] == 768
    capsys.readouterr()
    main(["--model", "qwen2.5-vl-7b", "--image-size", "1024x768", "--budget-fractions", "0.5"])
    out = capsys.readouterr().out
    assert "1 image(s) of 1024x768 px, 999 vision tokens each (grids 27x37)" in out
    main(["--model", "llava-onevision-7b", "--image-size", "1024x768", "--budgets", "1000"])
    assert "4671 vision tokens each (grids 27x27 + 54x73 + 54 newline)" in capsys.readouterr().out
    # a larger image under smaller pixel bounds
    (row,) = main(["--model", "qwen2.5-vl-7b", "--image-size", "2000x2000", "--max-pixels", str(28 * 28 * 1280),
                   "--budgets", "", "--budget-fractions", "", "--json"])
    assert row["image"]["grids"] == [[35, 35]]  # 1988^2 px > 1003520: floor(2000 / sqrt(4e6 / 1003520) / 28) = 35
    for argv, message in [(["--model", "qwen2.5-vl-7b"], "follow each image's size"),
                          (["--model", "qwen2.5-vl-7b", "--image-size", "1024"], "expected WIDTHxHEIGHT"),
                          (["--image-size", "64x64", "--max-pixels", "9"], "has no Qwen image processor")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "qwen3-vl-8b", "--image-size", "640x480", "--method", "tome", "--budget-fractions", "0.5"])
    assert capsys.readouterr().err.startswith("error: tome at budget fraction 0.5: prune method tome acts before")
