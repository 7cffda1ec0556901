"""One-shot inference (``python -m llava.eval.run_llava``): the same answer as the library path,
and the pruning flags reach the decoder."""

import pytest
import torch

from llava.eval.run_llava import build_prompt, main
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range


def _image(tmp_path, random_images):
    path = tmp_path / "image.png"
    random_images[0].save(path)
    return str(path)


def test_greedy_answer_equals_generate_through_the_library(tiny_deep_dir, tmp_path, random_images, capsys):
    image = _image(tmp_path, random_images)
    flags = ["--model-path", tiny_deep_dir, "--image-file", image, "--query", "What is this?",
             "--temperature", "0", "--max_new_tokens", "6", "--device", "cpu"]
    answer = main(flags + ["--no-pruning"])
    assert capsys.readouterr().out.splitlines()[-1] == answer

    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    prompt = build_prompt("What is this?", model.config.conv_mode or "vicuna_v1", model.config.mm_use_im_start_end)
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
    pixels = process_images([load_image(image)], processor, model.config)
    with torch.inference_mode():
        output = model.generate(input_ids, images=pixels, do_sample=False, max_new_tokens=6,
                                pad_token_id=tokenizer.pad_token_id)
    assert answer == tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip()


def test_pruning_flags_set_the_schedule_report_it_and_answer_as_the_uncached_loop(tiny_deep_dir, tmp_path,
                                                                                 random_images, capsys):
    image = _image(tmp_path, random_images)
    steps = 8
    answer = main(["--model-path", tiny_deep_dir, "--image-file", image, "--query", "What is this?",
                   "--temperature", "0", "--max_new_tokens", str(steps), "--device", "cpu",
                   "--prune-layers", "2,4", "--drop-ratio", "0.5"])
    report = capsys.readouterr().out.splitlines()[-1]
    assert report.startswith("[vision tokens entering each stage: [36, 18, 9];"), report

    # The reference: greedy decoding by whole-sequence forwards without a cache.
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    model.configure_pruning(prune_layers=[2, 4], drop_ratio=0.5)
    prompt = build_prompt("What is this?", model.config.conv_mode or "vicuna_v1", model.config.mm_use_im_start_end)
    sequence = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
    pixels = process_images([load_image(image)], processor, model.config)
    tokens = []
    with torch.no_grad():
        while len(tokens) < steps and (not tokens or tokens[-1] != tokenizer.eos_token_id):
            logits = model(input_ids=torch.cat([sequence, torch.tensor([tokens], dtype=torch.long)], 1),
                           images=pixels, use_cache=False).logits
            tokens.append(int(logits[0, -1].argmax()))
    assert answer and answer == tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_upstream_eval_model_takes_upstreams_args_object(tiny_deep_dir, tmp_path, random_images, capsys):
    from llava.eval.run_llava import eval_model
    from llava.mm_utils import get_model_name_from_path

    image = _image(tmp_path, random_images)
    # exactly the object upstream's README builds (class attributes, no pruning or device fields)
    args = type("Args", (), {
        "model_path": tiny_deep_dir, "model_base": None, "model_name": get_model_name_from_path(tiny_deep_dir),
        "query": "What is this?", "conv_mode": None, "image_file": image, "sep": ",", "temperature": 0,
        "top_p": None, "num_beams": 1, "max_new_tokens": 6,
    })()
    answer = eval_model(args)
    assert capsys.readouterr().out.splitlines()[-1] == answer
    assert answer == main(["--model-path", tiny_deep_dir, "--image-file", image, "--query", "What is this?",
                           "--temperature", "0", "--max_new_tokens", "6"])
