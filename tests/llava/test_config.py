"""The ADSC config hook: validated when the config is made, solved when the model is built."""

import json
import shutil

import pytest

from adsc_patch import ScheduleError
from llava.model import LlavaConfig
from llava.model.builder import load_pretrained_model


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prune_layers=[4]), "out of range"),
        (dict(prune_layers=[1, 1]), "duplicates"),
        (dict(prune_layers=[1], drop_ratio=1.0), r"\[0, 1\)"),
        (dict(prune_selection="saliency"), "prune_selection"),  # ("random" is a selection now)
        (dict(prune_method="sparsevlm"), "prune_method"),  # (tome, visionzip, pool are methods now)
        (dict(prune_method="pool", prune_layers=[1]), "prune_method pool reduces the image before the language model"),
    ],
)
def test_bad_pruning_fields_are_refused_when_the_config_is_made(fields, message):
    with pytest.raises(Exception, match=message) as info:
        LlavaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, **fields)
    assert isinstance(info.value, ScheduleError) or isinstance(info.value.__cause__, ScheduleError)


def test_config_with_only_a_budget_is_solved_when_the_model_is_built(tiny_llava_dir, tmp_path):
    folder = tmp_path / "budget"
    shutil.copytree(tiny_llava_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(prune_layers=[1, 2], drop_ratio=0.0, vision_token_budget=14)
    (folder / "config.json").write_text(json.dumps(config))
    _, model, _, _ = load_pretrained_model(str(folder), device="cpu")
    assert model.config.drop_ratio > 0
    assert abs(model.vision_schedule().average_tokens - 14) <= 1


def test_zero_token_schedule_is_refused_when_the_model_is_built(tiny_llava_dir, tmp_path):
    folder = tmp_path / "zero"
    shutil.copytree(tiny_llava_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(prune_layers=[1, 2, 3], drop_ratio=0.9)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScheduleError, match="leaves zero"):
        load_pretrained_model(str(folder), device="cpu")


def test_linear_projector_uses_upstream_keys(tmp_path):
    from safetensors.torch import load_file

    from llava.tools.make_tiny_checkpoint import make_tiny_checkpoint

    out = make_tiny_checkpoint(str(tmp_path / "linear"), projector="linear")
    keys = load_file(f"{out}/model.safetensors").keys()
    assert "model.mm_projector.weight" in keys and "model.mm_projector.bias" in keys
    _, model, _, _ = load_pretrained_model(out, device="cpu")
    assert model.config.mm_projector_type == "linear"


def test_mlp3x_gelu_projector_has_three_linear_layers():
    from llava.model.multimodal_projector.builder import build_vision_projector

    projector = build_vision_projector(LlavaConfig(hidden_size=64, num_attention_heads=4, mm_hidden_size=32,
                                                   mm_projector_type="mlp3x_gelu"))
    assert [type(m).__name__ for m in projector] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
