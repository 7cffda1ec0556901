"""QLoRA (``--bits 4/8``): LoRA on a bitsandbytes-quantised language model, the projector trained in
full precision, the vision tower unquantised; bitsandbytes runs it on the CPU (slowly)."""

import json
import os

import bitsandbytes as bnb  # a dev dependency: the QLoRA path is tested on the CPU
import pytest
import torch

from llava.cli import InputError
from llava.model.builder import load_pretrained_model
from llava.train.train import run_training

# compat: meets transformers' quantisation and peft internals
pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]


def _argv(out, model_dir, data_dir, *extra):
    return [
        "--model_name_or_path", model_dir, "--data_path", os.path.join(data_dir, "data.json"),
        "--image_folder", data_dir, "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--mm_projector_lr", "1e-2", "--lora_r", "8", "--lora_alpha", "16",
        "--prune_layers", "1,3", "--vision_token_budget", "12", "--use_cpu", "True", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1", *extra,
    ]


def _check_quantised(result, linear_class):
    model = result.model
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, linear_class)  # LoRA wraps the quantised layer
    for part in (model.model.mm_projector, model.get_vision_tower()):
        assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in part.modules())
    trainable = {n: p for n, p in result.trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "mm_projector.modules_to_save" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in trainable.items() if "mm_projector" in n)
    assert not any(p.requires_grad for p in model.get_vision_tower().parameters())


def _answers(out, base, random_images):
    from llava.mm_utils import process_images
    from tests.helpers import prompt_ids

    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tokenizer, model, processor, _ = load_pretrained_model(str(out), model_base=base, device="cpu")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # merged on the full-precision base
    pixels = process_images(random_images[:1], processor, model.config)
    prompt = prompt_ids(tokenizer, "What color is the shape?")
    with torch.no_grad():
        generated = model.generate(prompt[None], images=pixels,
                                   max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert generated.shape == (1, 3)
    # greedy by hand: each token the argmax of one uncached forward over prompt + tokens so far,
    # end of sequence excluded (min_new_tokens=3)
    tokens = []
    with torch.no_grad():
        for _ in range(3):
            sequence = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)])[None]
            logits = model(input_ids=sequence, images=pixels, use_cache=False).logits[0, -1]
            logits[tokenizer.eos_token_id] = float("-inf")
            tokens.append(int(logits.argmax()))
    assert generated[0].tolist() == tokens
    # the adapter was merged: text-only logits (no projector involved) differ from the base's
    _, base_model, _, _ = load_pretrained_model(base, device="cpu")
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        same = torch.allclose(model(input_ids=ids).logits, base_model(input_ids=ids).logits, atol=1e-4)
        assert not same, "text-only logits equal the base's: the LoRA adapter was not applied"


def test_4bit_qlora_trains_and_its_output_loads_on_the_base(tmp_path, tiny_deep_dir, tiny_data, random_images):
    out = tmp_path / "q4"
    result = run_training(_argv(out, tiny_deep_dir, tiny_data, "--bits", "4", "--max_steps", "4"))
    _check_quantised(result, bnb.nn.Linear4bit)
    weight = result.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # --quant_type, --double_quant
    losses = json.loads((out / "adsc_training.json").read_text())["train_loss"]
    assert len(losses) == 4 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5
    _answers(out, tiny_deep_dir, random_images)


def test_8bit_qlora_with_gradient_checkpointing(tmp_path, tiny_deep_dir, tiny_data, random_images):
    out = tmp_path / "q8"
    result = run_training(_argv(out, tiny_deep_dir, tiny_data, "--bits", "8", "--max_steps", "1",
                                "--gradient_checkpointing", "True"))
    _check_quantised(result, bnb.nn.Linear8bitLt)
    assert result.model.model.gradient_checkpointing
    assert len(json.loads((out / "adsc_training.json").read_text())["train_loss"]) == 1
    _answers(out, tiny_deep_dir, random_images)


@pytest.mark.parametrize("extra, message", [
    (["--bits", "4", "--finetune_mode", "full"],
     "--bits 4 \\(QLoRA\\) .* cannot be combined with --finetune_mode full"),
    (["--bits", "8", "--tune_mm_mlp_adapter", "True"], "cannot be combined with --tune_mm_mlp_adapter True"),
    (["--bits", "2"], "--bits must be 4 or 8"),
])
def test_qlora_refuses_what_it_cannot_train(tmp_path, tiny_deep_dir, tiny_data, extra, message):
    with pytest.raises(InputError, match=message):
        run_training(_argv(tmp_path / "out", tiny_deep_dir, tiny_data, "--max_steps", "1", *extra))
