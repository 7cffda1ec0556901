"""load_pretrained_model on every checkpoint layout, parity with transformers' Llava, bad inputs."""

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from adsc_patch import compat
from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images
from llava.model import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.builder import CheckpointError, detect_checkpoint_format, load_pretrained_model
from tests.helpers import QUESTIONS, pad_batch, prompt_ids

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range


def _logits(model, tokenizer, processor, images, side="left"):
    seqs = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, side)
    pixels = process_images(images, processor, model.config)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, images=pixels).logits


def test_full_checkpoint_loads_with_the_tower_from_mm_vision_tower(tiny_llava_dir, loaded_tiny):
    tokenizer, model, processor, context_len = loaded_tiny
    assert detect_checkpoint_format(tiny_llava_dir) == "full"
    assert isinstance(model, LlavaLlamaForCausalLM) and context_len == 2048
    saved = load_file(os.path.join(tiny_llava_dir, "model.safetensors"))
    assert not any(k.startswith("model.vision_tower.") for k in saved)  # like released LLaVA-1.5
    assert "model.mm_projector.0.weight" in saved and "model.mm_projector.2.weight" in saved
    tower = load_file(os.path.join(tiny_llava_dir, "vision_tower", "model.safetensors"))
    for key, value in tower.items():
        torch.testing.assert_close(model.get_vision_tower().vision_tower.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(model.model.mm_projector[0].weight, saved["model.mm_projector.0.weight"], rtol=0, atol=0)


def test_upstream_layout_round_trips_save_and_load(loaded_tiny, tmp_path, random_images):
    tokenizer, model, processor, _ = loaded_tiny
    before = _logits(model, tokenizer, processor, random_images)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llava_llama"
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    for field in ("mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
                  "mm_vision_select_feature", "image_aspect_ratio", "prune_layers", "drop_ratio"):
        assert field in config
    tokenizer2, model2, processor2, _ = load_pretrained_model(str(tmp_path), device="cpu")
    torch.testing.assert_close(_logits(model2, tokenizer2, processor2, random_images), before, rtol=0, atol=0)


def test_pre_2024_model_type_llava_loads_as_llava_llama(tiny_llava_dir, tmp_path, loaded_tiny, random_images):
    folder = tmp_path / "old"
    shutil.copytree(tiny_llava_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llava"
    config["mm_resampler_type"] = None  # leftovers of old configs are tolerated
    config["image_grid_pinpoints"] = None
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer, model, processor, _ = load_pretrained_model(str(folder), device="cpu")
    assert model.config.model_type == "llava_llama"
    torch.testing.assert_close(
        _logits(model, tokenizer, processor, random_images),
        _logits(loaded_tiny[1], loaded_tiny[0], loaded_tiny[2], random_images),
        rtol=0, atol=0,
    )


def _make_lora_output(base_model, out_dir):
    """A LoRA training output in upstream's layout, with a changed projector."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = LlavaLlamaForCausalLM(base_model.config)
    model.load_state_dict(base_model.state_dict())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
                      init_lora_weights=False)
    with compat.peft_without_alias_warnings():
        peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for param in model.model.mm_projector.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(out_dir)
    model.config.save_pretrained(out_dir)
    non_lora = {f"base_model.model.{k}": v.clone() for k, v in model.state_dict().items() if "mm_projector" in k}
    torch.save(non_lora, os.path.join(out_dir, "non_lora_trainables.bin"))
    return peft_model.merge_and_unload()


def test_lora_output_plus_base_equals_the_merged_model(tiny_llava_dir, loaded_tiny, tmp_path, random_images):
    tokenizer, base, processor, _ = loaded_tiny
    lora_dir = tmp_path / "llava-lora"
    merged = _make_lora_output(base, str(lora_dir))
    assert detect_checkpoint_format(str(lora_dir)) == "lora"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # peft reads a property transformers renamed
        tok, model, proc, _ = load_pretrained_model(str(lora_dir), model_base=tiny_llava_dir, device="cpu")
    assert not any("lora_" in name for name, _ in model.named_parameters())
    expected = _logits(merged.eval(), tokenizer, processor, random_images)
    torch.testing.assert_close(_logits(model, tok, proc, random_images), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, _logits(base, tokenizer, processor, random_images), atol=1e-3)


def test_lora_folder_name_does_not_matter(tiny_llava_dir, loaded_tiny, tmp_path, random_images):
    tokenizer, base, processor, _ = loaded_tiny
    out = tmp_path / "some-run"  # neither "llava" nor "lora" in the name
    merged = _make_lora_output(base, str(out))
    tok, model, proc, _ = load_pretrained_model(str(out), model_base=tiny_llava_dir, device="cpu")
    assert isinstance(model, LlavaLlamaForCausalLM)
    # The adapter is merged, by the rule written here: W = W_base + (alpha / r) B A, from the files.
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    base_weights = load_file(os.path.join(tiny_llava_dir, "model.safetensors"))
    loaded = model.state_dict()
    pairs = [k for k in adapter if k.endswith(".lora_A.weight")]
    assert len(pairs) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down in every layer
    for key_a in pairs:
        name = key_a.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
        a, b = adapter[key_a], adapter[key_a.replace(".lora_A.", ".lora_B.")]
        delta = scale * b @ a
        assert delta.abs().max() > 1e-3, name  # a real change, so that ignoring it shows
        torch.testing.assert_close(loaded[name], base_weights[name] + delta, atol=1e-6, rtol=1e-5)
    projector = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    for key, value in projector.items():
        torch.testing.assert_close(loaded[key.removeprefix("base_model.model.")], value, rtol=0, atol=0)
    # ... and it shows in the outputs: the merged model's logits, text-only logits unlike the base's
    expected = _logits(merged.eval(), tokenizer, processor, random_images)
    torch.testing.assert_close(_logits(model, tok, proc, random_images), expected, atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[1, 5, 7, 9, 11]])  # no image: only the language model (the adapter's part)
    with torch.no_grad():
        same = torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)
        assert not same, "text-only logits equal the base's: the LoRA adapter was not applied"


def test_projector_only_output_plus_base(tiny_llava_dir, loaded_tiny, tmp_path, random_images):
    tokenizer, base, processor, _ = loaded_tiny
    # a "language model only" base: the tiny checkpoint without its projector
    lm_dir = tmp_path / "vicuna"
    shutil.copytree(tiny_llava_dir, lm_dir)
    weights = load_file(str(lm_dir / "model.safetensors"))
    projector = {k: v for k, v in weights.items() if "mm_projector" in k}
    from safetensors.torch import save_file

    save_file({k: v for k, v in weights.items() if "mm_projector" not in k}, str(lm_dir / "model.safetensors"),
              metadata={"format": "pt"})
    pretrain_dir = tmp_path / "pretrain"
    pretrain_dir.mkdir()
    base.config.save_pretrained(pretrain_dir)
    torch.save(projector, pretrain_dir / "mm_projector.bin")
    assert detect_checkpoint_format(str(pretrain_dir)) == "projector"
    tok, model, proc, _ = load_pretrained_model(str(pretrain_dir), model_base=str(lm_dir), device="cpu")
    torch.testing.assert_close(
        _logits(model, tok, proc, random_images), _logits(base, tokenizer, processor, random_images), rtol=0, atol=0
    )
    # the base alone has no projector: refused, never re-initialised silently
    with pytest.raises(ValueError, match="no projector weights"):
        load_pretrained_model(str(lm_dir), device="cpu")


def _hf_inputs(hf_model, tokenizer, processor, images, side):
    """llava-hf style inputs: <image> expanded to one token per patch."""
    n = hf_model.config.image_seq_length
    seqs = []
    for q in QUESTIONS:
        ids = prompt_ids(tokenizer, q)
        pieces = []
        for token in ids.tolist():
            pieces.extend([hf_model.config.image_token_id] * n if token == IMAGE_TOKEN_INDEX else [token])
        seqs.append(torch.tensor(pieces))
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, side)
    pixels = process_images(images, processor, type("cfg", (), {"image_aspect_ratio": "pad"}))
    return ids, mask, pixels


@pytest.mark.parametrize("side", ["left", "right"])
def test_hf_llava_converts_with_identical_logits_and_generations(tiny_hf_dir, random_images, side):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(tiny_hf_dir).eval()
    assert detect_checkpoint_format(tiny_hf_dir) == "hf"
    tokenizer, model, processor, _ = load_pretrained_model(tiny_hf_dir, device="cpu")
    assert isinstance(model, LlavaLlamaForCausalLM)
    ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images, side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
    ours = _logits(model, tokenizer, processor, random_images, side)
    assert ours.shape == expected.shape
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)
    if side == "left":
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with torch.no_grad():
            hf_gen = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)[:, ids.shape[1]:]
            seqs = [prompt_ids(tokenizer, q) for q in QUESTIONS]
            our_ids, our_mask = pad_batch(seqs, tokenizer.pad_token_id, "left")
            our_gen = model.generate(our_ids, images=pixels, attention_mask=our_mask, **kwargs)
        assert our_gen.tolist() == hf_gen.tolist()


def test_sentencepiece_only_tokenizer_is_read(tiny_llava_dir, loaded_tiny):
    files = set(os.listdir(tiny_llava_dir))
    assert "tokenizer.model" in files and "tokenizer_config.json" in files and "tokenizer.json" not in files
    tokenizer = loaded_tiny[0]
    assert tokenizer.pad_token == "<unk>" and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2


# ----------------------------------------------------------------------------- bad inputs
def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained_model(str(tmp_path / "nope"), device="cpu")


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_pretrained_model(str(tmp_path), device="cpu")


def test_lora_without_base_names_the_missing_base(loaded_tiny, tmp_path):
    _make_lora_output(loaded_tiny[1], str(tmp_path / "lora"))
    with pytest.raises(CheckpointError, match=r"give its base with --model-base \(model_base= in Python\)"):
        load_pretrained_model(str(tmp_path / "lora"), device="cpu")


def test_full_checkpoint_with_a_base_is_refused(tiny_llava_dir):
    with pytest.raises(CheckpointError, match="model_base is only for"):
        load_pretrained_model(tiny_llava_dir, model_base=tiny_llava_dir, device="cpu")


def test_incompatible_base_and_lora_pair_is_refused(loaded_tiny, tiny_deep_dir, tmp_path):
    _make_lora_output(loaded_tiny[1], str(tmp_path / "lora"))
    with pytest.raises(CheckpointError, match="num_hidden_layers: 4 vs base 8"):
        load_pretrained_model(str(tmp_path / "lora"), model_base=tiny_deep_dir, device="cpu")


def test_unknown_projector_type_is_refused(loaded_tiny):
    config = LlavaConfig.from_dict({**loaded_tiny[1].config.to_dict(), "mm_projector_type": "mlp2x_relu"})
    with pytest.raises(ValueError, match="unknown projector type 'mlp2x_relu'"):
        LlavaLlamaForCausalLM(config)


def test_more_image_markers_than_images_is_refused(loaded_tiny, random_images):
    tokenizer, model, processor, _ = loaded_tiny
    ids = torch.cat([prompt_ids(tokenizer, "Compare <image> with"), torch.tensor([IMAGE_TOKEN_INDEX])])[None]
    pixels = process_images(random_images[:1], processor, model.config)
    with pytest.raises(ValueError, match="3 <image> markers .* only 1 image"):
        model.generate(ids, images=pixels, max_new_tokens=2)
    with pytest.raises(ValueError, match="no images were given"):
        model.generate(ids, max_new_tokens=2)


def test_offline_hub_vision_tower_is_explained(tiny_llava_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, folder, ignore=shutil.ignore_patterns("vision_tower"))
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="hub is offline"):
        load_pretrained_model(str(folder), device="cpu")
    # ... and a local copy given explicitly fixes it
    _, model, _, _ = load_pretrained_model(
        str(folder), device="cpu", vision_tower=os.path.join(tiny_llava_dir, "vision_tower")
    )
    assert model.get_vision_tower().num_patches == 36


def test_a_merged_model_moved_with_its_base_still_loads(tiny_llava_dir, loaded_tiny, tmp_path, random_images):
    """The merge tool (and training's outputs) write the tower relative to the model folder:
    moving the folder that holds the base (with its tower) and the merged model breaks nothing."""
    import shutil

    from llava.tools.merge_lora_weights import merge_lora

    run = tmp_path / "run"
    base = run / "base"
    shutil.copytree(tiny_llava_dir, base)
    _, base_model, processor, _ = load_pretrained_model(str(base), device="cpu")
    _make_lora_output(base_model, str(run / "lora"))
    merge_lora(str(run / "lora"), str(base), str(run / "merged"))
    saved = json.load(open(run / "merged" / "config.json"))
    assert saved["mm_vision_tower"] == os.path.join("..", "base", "vision_tower")
    pixels = process_images(random_images[:1], processor, base_model.config)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 9]])
    with torch.no_grad():
        before = load_pretrained_model(str(run / "merged"), device="cpu")[1](input_ids=ids, images=pixels).logits
    shutil.move(str(run), str(tmp_path / "moved"))
    _, moved, _, _ = load_pretrained_model(str(tmp_path / "moved" / "merged"), device="cpu")
    assert moved.get_vision_tower().vision_tower_name == os.path.abspath(tmp_path / "moved" / "base" / "vision_tower")
    with torch.no_grad():
        torch.testing.assert_close(moved(input_ids=ids, images=pixels).logits, before, atol=0, rtol=0)
