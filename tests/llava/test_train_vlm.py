"""The ADSC fine-tune of transformers' own VLMs (``llava.train.vlm_train``) on a tiny random
Qwen2.5-VL (``make_tiny_vlm``: 4 layers; a 32 x 32 picture is a 4 x 4 grid of 16 tokens):
labels, a few LoRA steps of the recipe, the pruned loss, the curriculum on resume, the merged
output, one-line errors; a tiny Qwen3-VL (DeepStack mergers) through the same recipe."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adsc_patch import PruningSpec, pruning
from llava.cli import InputError
from llava.constants import IGNORE_INDEX
from llava.model.vlm import load_processor, load_transformers_vlm, read_recorded_spec
from llava.tools.make_tiny_vlm import make_tiny_vlm
from llava.train import vlm_train
from llava.train.data import DataError
from llava.train.train import run_training
from llava.train.vlm_data import VlmDataCollator, encode_vlm_sample, sample_messages, split_segments

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = 0.333
STEPS = 6
SAVE_AT = 3
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 230), "white": (250, 250, 250)}


def _picture(color, width=32, height=32, seed=0):
    rng = np.random.RandomState(seed)
    pixels = np.clip(np.array(color)[None, None] + rng.randint(-20, 20, (height, width, 3)), 0, 255)
    return Image.fromarray(pixels.astype("uint8"))


def _records():
    """Three LLaVA-format samples and one in the chat format with two images."""
    records = [{"id": f"color-{i}", "image": f"images/{name}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the picture?"},
        {"from": "gpt", "value": f"It is {name}."}]} for i, name in enumerate(list(COLORS)[:3])]
    records.append({"id": "chat-two", "images": ["images/white.png", "images/red.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": "It is white."},
        {"role": "user", "content": "<image> And this one?"},
        {"role": "assistant", "content": [{"type": "text", "text": "This one is red."}]}]})
    return records


def _write_data(folder, records=None):
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for seed, (name, color) in enumerate(COLORS.items()):
        _picture(color, seed=seed).save(os.path.join(folder, "images", f"{name}.png"))
    _picture((128, 128, 0), width=24, height=32).save(os.path.join(folder, "images", "small.png"))  # 4 x 3 tokens
    with open(os.path.join(folder, "data.json"), "w") as f:
        json.dump(_records() if records is None else records, f)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return make_tiny_vlm(str(tmp_path_factory.mktemp("tiny_qwen2_5_vl")))


@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("vlm_data"))


@pytest.fixture(scope="module")
def processor(tiny_vlm):
    return load_processor(tiny_vlm)


def _argv(output_dir, model_dir, data_dir, *extra):
    return [
        "--model_name_or_path", model_dir, "--data_path", os.path.join(data_dir, "data.json"),
        "--image_folder", data_dir, "--output_dir", str(output_dir), "--lora_enable", "True",
        "--prune_method", "adsc", "--budget_fraction", str(TARGET), "--prune_layers", "1", "--curriculum", "reverse",
        "--max_steps", str(STEPS), "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
        "--mm_projector_lr", "5e-3", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
        "--use_cpu", "True", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "steps",
        "--save_steps", str(SAVE_AT), "--save_total_limit", "2", "--save_every_minutes", "0", *extra,
    ]


def _phase_lines(text):
    return re.findall(r"step (\d+): curriculum phase (\d)/3 from step (\d+): budget fraction ([\d.]+) x target = "
                      r"([\d.]+)", text)


class _Spy:
    """Records every spec ``vlm_train`` hands ``apply_adsc``, then applies it."""

    def __init__(self):
        self.specs = []
        self.apply = vlm_train.apply_adsc

    def __call__(self, model, spec):
        self.specs.append(spec)
        return self.apply(model, spec)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_vlm, vlm_data):
    """The recipe: 6 LoRA steps (one batch of all four samples each step), checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("recipe") / "out"
    spy = _Spy()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vlm_train, "apply_adsc", spy)
        result = run_training(_argv(out, tiny_vlm, vlm_data))
    return result, spy.specs


def _phase_fractions(total, fractions=(1 / 3,) * 3, factors=(0.8, 0.9, 1.0)):
    """The rule: phase i starts at round(total x sum(fractions[:i])) and trains at factor_i x target."""
    starts = [round(total * sum(fractions[:i])) for i in range(len(fractions))]
    return starts, [f * TARGET for f in factors]


def _kept_by_rule(tokens, fraction, layers=4, prune_layer=1):
    """Tokens kept after a single prune layer: the count whose mean over the layers is closest to
    the fraction of the image's own tokens (at least one; the first layer sees all of them)."""
    budget = fraction * tokens
    averages = {k: (tokens * prune_layer + k * (layers - prune_layer)) / layers for k in range(1, tokens)}
    return min(averages, key=lambda k: (abs(averages[k] - budget), averages[k] > budget))


# ------------------------------------------------------------------------------ (a) labels
def _labelled_runs(ids, labels):
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_exactly_the_assistant_tokens_are_labelled(processor, vlm_data):
    record = _records()[3]  # two turns, two images of the chat format
    sample = sample_messages(record, 3)
    images = [Image.open(os.path.join(vlm_data, path)).convert("RGB") for path in sample.images]
    encoded = encode_vlm_sample(processor, sample, images)
    ids, labels = encoded.inputs["input_ids"].tolist(), encoded.labels.tolist()
    tokenizer = processor.tokenizer
    runs = [tokenizer.decode(run) for run in _labelled_runs(ids, labels)]
    assert runs == ["It is white.<|im_end|>", "This one is red.<|im_end|>"]  # reply + the template's end of turn
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(image_pad) == 16 + 16 and all(label == IGNORE_INDEX for token, label in zip(ids, labels)
                                                   if token == image_pad)
    # the segments' concatenation is the processor's own encoding of the whole render
    full = processor.apply_chat_template(sample.messages, tokenize=False)
    whole = processor(text=[full], images=images, add_special_tokens=False, return_tensors="pt")
    assert ids == whole["input_ids"][0].tolist()
    assert torch.equal(encoded.inputs["image_grid_thw"], whole["image_grid_thw"])
    torch.testing.assert_close(encoded.inputs["pixel_values"], whole["pixel_values"])
    assert encoded.inputs["mm_token_type_ids"].tolist() == whole["mm_token_type_ids"][0].tolist()
    assert "".join(split_segments(processor, sample)[0]) == full


def test_llava_records_place_images_at_their_markers_and_label_every_reply(processor, vlm_data):
    record = {"id": "two", "image": ["images/red.png", "images/small.png"], "conversations": [
        {"from": "human", "value": "Look: <image>\nWhat color?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "Olive."}]}
    sample = sample_messages(record, 0)
    assert sample.messages[0]["content"] == [{"type": "text", "text": "Look:"}, {"type": "image"},
                                             {"type": "text", "text": "What color?"}]
    images = [Image.open(os.path.join(vlm_data, path)).convert("RGB") for path in sample.images]
    encoded = encode_vlm_sample(processor, sample, images)
    ids, labels = encoded.inputs["input_ids"].tolist(), encoded.labels.tolist()
    assert [processor.tokenizer.decode(r) for r in _labelled_runs(ids, labels)] == ["Red.<|im_end|>",
                                                                                     "Olive.<|im_end|>"]
    assert encoded.inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 6]]  # 16 and 12 tokens, in order
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.count("<|image_pad|>") == 28


def test_collator_right_pads_and_joins_images_in_row_order():
    collate = VlmDataCollator(pad_token_id=0)
    rows = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]),
         "attention_mask": torch.ones(3, dtype=torch.long), "mm_token_type_ids": torch.tensor([0, 1, 0]),
         "pixel_values": torch.ones(4, 2), "image_grid_thw": torch.tensor([[1, 2, 2]])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long),
         "mm_token_type_ids": torch.tensor([0])},
        {"input_ids": torch.tensor([9, 9]), "labels": torch.tensor([-100, 9]),
         "attention_mask": torch.ones(2, dtype=torch.long), "mm_token_type_ids": torch.tensor([1, 1]),
         "pixel_values": torch.zeros(8, 2), "image_grid_thw": torch.tensor([[1, 2, 4]])},
    ]
    batch = collate(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 0], [1, 1, 0]]
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    assert batch["pixel_values"].shape == (12, 2) and batch["pixel_values"][:4].sum() == 8
    # LLaVA-NeXT's layout: images x crops x C x H x W, crops zero-padded to the batch's most
    one = {"input_ids": torch.tensor([1]), "labels": torch.tensor([1])}
    next_rows = [{**one, "pixel_values": torch.ones(1, 3, 3, 2, 2), "image_sizes": torch.tensor([[2, 2]])},
                 {**one, "pixel_values": torch.ones(1, 5, 3, 2, 2), "image_sizes": torch.tensor([[2, 4]])}]
    batch = collate(next_rows)
    assert batch["pixel_values"].shape == (2, 5, 3, 2, 2) and batch["pixel_values"][0, 3:].abs().sum() == 0
    assert batch["image_sizes"].tolist() == [[2, 2], [2, 4]]


# ------------------------------------------------------------------------------ (b) the recipe trains
def test_lora_steps_lower_the_loss_and_change_only_lora_and_merger_weights(recipe, tiny_vlm):
    from transformers import AutoModelForImageTextToText

    result, _ = recipe
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.05
    before = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32).state_dict()
    after = result.trainer.model.state_dict()  # the PEFT model, not merged
    changed_lora, changed_merger, unchanged = set(), set(), 0
    for key, value in after.items():
        plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
        if "lora_" in key:
            assert ".language_model.layers." in key and "visual" not in key
            if not torch.all(value == 0):
                changed_lora.add(key)
            continue
        if "modules_to_save" in key:
            original = plain.replace(".modules_to_save.default", "")
            assert original.startswith("model.visual.merger.")
            if not torch.equal(value, before[original]):
                changed_merger.add(original)
            continue
        plain = plain.replace(".original_module", "")
        assert torch.equal(value, before[plain]), f"{plain} changed in LoRA mode"
        unchanged += 1
    assert len(changed_lora) >= 7 * 4  # B of q, k, v, o, gate, up, down in each of the 4 layers
    merger = ("ln_q.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
    assert changed_merger == {f"model.visual.merger.{n}" for n in merger}
    vision = [k for k in before if k.startswith("model.visual.blocks.")]
    assert vision and unchanged >= len(vision) + 1


# ------------------------------------------------------------------------------ (c) training ran pruned
def test_training_ran_pruned_by_each_phase_spec(recipe, tiny_vlm):
    from transformers import AutoModelForImageTextToText

    result, specs = recipe
    starts, fractions = _phase_fractions(STEPS)
    assert starts == [0, 2, 4]
    expected = [PruningSpec("adsc", budget_fraction=f, layers=(1,)) for f in fractions]
    assert [s.budget_fraction for s in specs] == pytest.approx(fractions + [TARGET])  # phases, then the final
    assert specs[:3] == [expected[0], expected[1], PruningSpec("adsc", budget_fraction=TARGET, layers=(1,))]
    logged = [(e["step"], e["budget_fraction"]) for e in result.trainer.state.log_history if "loss" in e]
    assert logged == [(s, pytest.approx(fractions[sum(s - 1 >= b for b in starts) - 1], abs=1e-6))
                      for s in range(1, STEPS + 1)]

    # the first step's loss (LoRA's B is zero, the merger a copy) is the base model's pruned loss
    dataset = result.dataset
    batch = VlmDataCollator(0)([dataset[i] for i in range(len(dataset))])
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32)
    with torch.no_grad(), pruning(base, expected[0]) as session:
        pruned = base(**batch).loss.item()
    with torch.no_grad():
        unpruned = base(**batch).loss.item()
    first = next(e["loss"] for e in result.trainer.state.log_history if "loss" in e)
    assert first == pytest.approx(pruned, abs=1e-4) and abs(first - unpruned) > 1e-3  # a random model: close
    # what that spec keeps of each 16-token image, by the rule written above
    kept = _kept_by_rule(16, fractions[0])
    counts = session.trace.tokens_per_image_per_layer(4)
    assert kept == 1 and all(image == [16, kept, kept, kept] for row in counts for image in row)
    assert sum(len(row) for row in counts) == 5  # every image of the batch was pruned


# ------------------------------------------------------------------------------ (d) resume
def test_a_resumed_run_continues_in_the_phase_of_its_step(recipe, tmp_path, tiny_vlm, vlm_data, caplog):
    result, _ = recipe
    out = tmp_path / "crashed"
    out.mkdir()
    shutil.copytree(os.path.join(result.output_dir, f"checkpoint-{SAVE_AT}"), out / f"checkpoint-{SAVE_AT}")
    with caplog.at_level(logging.INFO, logger="llava.train"):
        resumed = run_training(_argv(out, tiny_vlm, vlm_data))
    starts, fractions = _phase_fractions(STEPS)
    phase = max(i for i, start in enumerate(starts) if SAVE_AT >= start)  # the phase of step 3 by the rule
    lines = _phase_lines(caplog.text)
    assert lines[0][:3] == (str(SAVE_AT), str(phase + 1), str(starts[phase]))
    assert float(lines[0][4]) == pytest.approx(fractions[phase], abs=1e-4)
    assert [line[:2] for line in lines[1:]] == [(str(s), str(i + 1)) for i, s in enumerate(starts) if s > SAVE_AT]
    assert resumed.trainer.state.global_step == STEPS
    summary = json.loads((out / "adsc_training.json").read_text())
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert summary["steps"] == STEPS and summary["train_loss"][:SAVE_AT] == losses[:SAVE_AT]  # from the checkpoint
    assert summary["train_loss"][SAVE_AT:] == pytest.approx(losses[SAVE_AT:], abs=1e-4)
    again = load_file(str(out / "adapter_model.safetensors"))
    uninterrupted = load_file(os.path.join(result.output_dir, "adapter_model.safetensors"))
    assert again.keys() == uninterrupted.keys()
    for key in again:
        torch.testing.assert_close(again[key], uninterrupted[key], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ (e) output and merge
def test_output_records_the_target_and_merges_into_a_checkpoint_that_loads(recipe, tiny_vlm, tmp_path):
    from llava.tools.merge_lora_weights import merge_lora

    result, _ = recipe
    out = result.output_dir
    target = PruningSpec("adsc", budget_fraction=TARGET, layers=(1,))
    assert {"adapter_config.json", "adapter_model.safetensors", "adsc_pruning.json", "adsc_training.json",
            "config.json", "tokenizer.json", "preprocessor_config.json", "chat_template.jinja"} <= set(os.listdir(out))
    assert read_recorded_spec(out) == target
    summary = json.loads(open(os.path.join(out, "adsc_training.json")).read())
    assert summary["target"] == target.to_dict() and summary["steps"] == STEPS and len(summary["curriculum"]) == 3
    assert json.load(open(os.path.join(out, "adapter_config.json")))["modules_to_save"] == ["model.visual.merger"]

    merged = merge_lora(out, tiny_vlm, str(tmp_path / "merged"))
    assert "adapter_config.json" not in os.listdir(merged)
    loaded = load_transformers_vlm(merged, device="cpu")
    assert loaded.recorded == target
    on_base = load_transformers_vlm(out, device="cpu")  # the adapter merged at load time
    base = load_transformers_vlm(tiny_vlm, device="cpu")
    batch = VlmDataCollator(0)([result.dataset[0]])
    with torch.no_grad():
        logits = loaded.model(**batch).logits
        torch.testing.assert_close(logits, on_base.model(**batch).logits)
        assert not torch.allclose(logits, base.model(**batch).logits, atol=1e-4)
        with pruning(loaded.model, loaded.recorded) as session:
            loaded.model(**batch)
    assert session.trace.tokens_per_image_per_layer(4) == [[[16] + [_kept_by_rule(16, TARGET)] * 3]]


def test_qlora_quantises_only_the_text_decoder_and_the_merger_has_its_own_learning_rate(tmp_path, tiny_vlm,
                                                                                       vlm_data):
    bnb = pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    result = run_training(_argv(out, tiny_vlm, vlm_data, "--bits", "4", "--max_steps", "2", "--save_strategy", "no",
                                "--mm_projector_lr", "1e-4"))
    model = result.model
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    quantised = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    for part in (model.model.visual, model.lm_head):
        assert not any(isinstance(m, quantised) for m in part.modules())
    trainable = {n for n, p in result.trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "visual.merger.modules_to_save" in n for n in trainable)
    merger = {id(p) for n, p in result.trainer.model.named_parameters() if p.requires_grad and "merger" in n}
    for group in result.trainer.optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert group["initial_lr"] == (1e-4 if ids <= merger else 5e-3) and (ids <= merger or not ids & merger)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded = load_transformers_vlm(str(out), device="cpu")  # merged onto the full-precision base
    assert type(loaded.model.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_a_frozen_projector_is_not_trained(tmp_path, tiny_vlm, vlm_data):
    out = tmp_path / "out"
    result = run_training(_argv(out, tiny_vlm, vlm_data, "--freeze_mm_mlp_adapter", "True", "--max_steps", "2",
                                "--save_strategy", "no"))
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] is None
    trainable = [n for n, p in result.trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("merger" in k for k in load_file(str(out / "adapter_model.safetensors")))


# ------------------------------------------------------------------------------ (f) one-line errors
def test_an_absolute_budget_is_refused_before_any_weight_loads(tmp_path, tiny_vlm, vlm_data):
    config_only = tmp_path / "qwen-config-only"
    config_only.mkdir()
    shutil.copy(os.path.join(tiny_vlm, "config.json"), config_only / "config.json")  # no weights to load
    argv = _argv(tmp_path / "out", str(config_only), vlm_data)
    argv[argv.index("--budget_fraction"):argv.index("--budget_fraction") + 2] = ["--vision_token_budget", "6"]
    with pytest.raises(InputError, match=r"^--vision_token_budget 6 is an absolute count of vision tokens, but .* is "
                                         r"a qwen2_5_vl model whose images differ in size: give --budget_fraction"):
        run_training(argv)
    proc = subprocess.run([sys.executable, "-m", "llava.train.train", *argv], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --vision_token_budget 6 is an absolute count")


def test_a_missing_image_names_the_sample_or_is_skipped(tmp_path, tiny_vlm):
    records = _records()
    records[1]["image"] = "images/nope.png"
    data = _write_data(tmp_path / "data", records)
    argv = _argv(tmp_path / "out", tiny_vlm, data, "--max_steps", "1", "--save_strategy", "no")
    with pytest.raises(DataError, match=r"^sample 'color-1' \(#1\): image file not found: .*nope.png \(fix "
                                        r"--image_folder, or pass --skip_missing_images True"):
        run_training(argv)
    result = run_training(argv + ["--skip_missing_images", "True"])
    assert result.dataset.skipped == ["sample 'color-1' (#1)"] and len(result.dataset) == 3


def test_an_image_too_small_for_a_phase_is_refused_naming_the_sample(tmp_path, tiny_vlm):
    records = _records()
    records[2]["image"] = "images/small.png"  # 12 tokens: 0.8 x 0.333 of them is out of reach at layer 1
    data = _write_data(tmp_path / "data", records)
    with pytest.raises(ValueError, match=r"infeasible for an image of 12 vision tokens \(sample 'color-2' \(#2\)"):
        run_training(_argv(tmp_path / "out", tiny_vlm, data, "--save_strategy", "no"))


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "image": "images/red.png", "conversations": [{"from": "human", "value": "<image> <image> Hi"},
                                                              {"from": "gpt", "value": "Yo"}]},
     r"sample 'a' \(#0\) has 1 image\(s\) but 2 <image> markers"),
    ({"id": "b", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
      "images": ["images/red.png"]}, r"sample 'b' \(#0\) places 0 image\(s\) in its messages but lists 1"),
    ({"id": "c", "messages": [{"role": "user", "content": "Hi"}]}, r"sample 'c' \(#0\): the last message must be"),
    ({"id": "d", "conversations": [{"from": "gpt", "value": "Yo"}]}, r"sample 'd' \(#0\): turns must alternate"),
])
def test_bad_records_are_refused_with_the_sample_named(tmp_path, tiny_vlm, record, message):
    data = _write_data(tmp_path / "data", [record])
    with pytest.raises(DataError, match=message):
        run_training(_argv(tmp_path / "out", tiny_vlm, data, "--save_strategy", "no"))


# ------------------------------------------------------------------------------ Qwen3-VL and the script
def _tiny_qwen3_vl(out, qwen2_5_dir):
    """A tiny random Qwen3-VL folder (DeepStack at vision layers 0 and 1) sharing the tiny
    Qwen2.5-VL's tokenizer, image processor (4-pixel patches, 2 x 2 merge) and chat template."""
    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(qwen2_5_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                            "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(1)
    Qwen3VLForConditionalGeneration(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(qwen2_5_dir, name), os.path.join(out, name))
    with open(os.path.join(qwen2_5_dir, "preprocessor_config.json")) as f:
        preprocessor = json.load(f)
    preprocessor["processor_class"] = "Qwen3VLProcessor"
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f)
    return str(out)


OV_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


def _tiny_llava_onevision(out, qwen2_5_dir):
    """A tiny random LLaVA-OneVision folder (SigLIP 16 px tiles of 4 x 4 patches, Qwen2 text model)
    with the tiny tokenizer plus ``<image>``/``<video>``, and Qwen's chat template placing
    ``<image>``."""
    from transformers import AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from llava.tools.make_tiny_vlm import QWEN_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(qwen2_5_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    template = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\\n").replace(
        "<|vision_start|><|video_pad|><|vision_end|>", "<video>\\n")
    tokenizer.chat_template = template
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=16, patch_size=4),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    torch.manual_seed(2)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                                      image_grid_pinpoints=OV_PINPOINTS)
    image_processor.save_pretrained(out)
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(template)
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16,
                   "vision_feature_select_strategy": "full"}, f)
    return str(out)


def test_llava_onevision_fine_tunes_its_projector_and_text_decoder_pruned(tmp_path, tiny_vlm, vlm_data,
                                                                         caplog):
    """Multi-image samples (each image a base view + newline) and single ones (base view and
    crop grid, unpadded): 5-D pixel values, image sizes and images per sample through the
    collator, the projector in full, the two grids of a single image pruned on their own."""
    model = _tiny_llava_onevision(tmp_path / "tiny_ov", tiny_vlm)
    processor = load_processor(model)  # its processor_config.json's settings carried without torchvision
    assert (processor.num_image_tokens, processor.vision_feature_select_strategy) == (16, "full")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="llava.train"):
        result = run_training(_argv(out, model, vlm_data, "--budget_fraction", "0.5", "--prune_layers", "1,2",
                                    "--max_steps", "3", "--save_strategy", "no"))
    assert len(_phase_lines(caplog.text)) == 3
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["model.multi_modal_projector"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("multi_modal_projector" in k for k in weights) and not any("vision_tower" in k for k in weights)
    batch = VlmDataCollator(0)([result.dataset[i] for i in range(4)])
    assert batch["pixel_values"].dim() == 5 and batch["image_sizes"].tolist() == [[32, 32]] * 5
    assert batch["batch_num_images"].tolist() == [1, 1, 1, 2]
    with torch.no_grad(), pruning(result.model, PruningSpec("adsc", budget_fraction=0.5, layers=(1, 2))) as session:
        result.model(**batch)
    # a single 32 x 32 image: its 4 x 4 base view and its 8 x 8 crop grid (2 x 2 tiles), each pruned to
    # half its own tokens on average (n, n/2 at layer 1, n/4 from layer 2: mean n/2); in the sample of
    # two images each is a base view alone
    base, crops = [16, 8, 4, 4], [64, 32, 16, 16]
    assert session.trace.tokens_per_image_per_layer(4) == [[base, crops]] * 3 + [[base, base]]
    loaded = load_transformers_vlm(str(out), device="cpu")
    assert type(loaded.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert loaded.recorded == PruningSpec("adsc", budget_fraction=0.5, layers=(1, 2))


def _run_script(script, env_extra, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               **env_extra)
    proc = subprocess.run(["bash", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_qwen3_vl_fine_tunes_through_its_script_with_the_deepstack_mergers(tmp_path, tiny_vlm, vlm_data):
    model = _tiny_qwen3_vl(tmp_path / "tiny_qwen3_vl", tiny_vlm)
    out = tmp_path / "out"
    log = _run_script(os.path.join(ROOT, "scripts", "qwen3_vl", "finetune_adsc_lora.sh"), dict(
        MODEL_PATH=model, DATA_PATH=os.path.join(vlm_data, "data.json"), IMAGE_FOLDER=vlm_data,
        OUTPUT_DIR=str(out), BUDGET_FRACTION=str(TARGET), PRUNE_LAYERS="1", GLOBAL_BATCH="4", PER_DEVICE_BATCH="4",
        MAX_STEPS="3", LR="5e-3", MM_PROJECTOR_LR="5e-3", LORA_R="8", LORA_ALPHA="16"))
    assert "launcher=python gpus=0" in log
    assert [line[:2] for line in _phase_lines(log)] == [("0", "1"), ("1", "2"), ("2", "3")]
    adapter = json.load(open(out / "adapter_config.json"))
    assert adapter["modules_to_save"] == ["model.visual.merger", "model.visual.deepstack_merger_list.0",
                                          "model.visual.deepstack_merger_list.1"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("deepstack_merger_list.1" in k for k in weights) and not any(".visual.blocks." in k for k in weights)
    loaded = load_transformers_vlm(str(out), device="cpu")
    assert type(loaded.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert loaded.recorded == PruningSpec("adsc", budget_fraction=TARGET, layers=(1,))


def test_the_qwen2_5_vl_script_runs_full_fine_tuning(tmp_path, tiny_vlm, vlm_data):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "out"
    log = _run_script(os.path.join(ROOT, "scripts", "qwen2_5_vl", "finetune_adsc_lora.sh"), dict(
        MODEL_PATH=tiny_vlm, DATA_PATH=os.path.join(vlm_data, "data.json"), IMAGE_FOLDER=vlm_data,
        OUTPUT_DIR=str(out), FINETUNE_MODE="full", DROP_RATIO="0.5", PRUNE_LAYERS="1,2", GLOBAL_BATCH="4",
        PER_DEVICE_BATCH="4", MAX_STEPS="2", LR="1e-3", GRADIENT_CHECKPOINTING="False"))
    assert "curriculum phase 1/3" in log
    assert read_recorded_spec(str(out)) == PruningSpec("adsc", drop_ratio=0.5, layers=(1, 2))
    before = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32).state_dict()
    loaded = load_transformers_vlm(str(out), device="cpu")
    after = loaded.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("model.visual.blocks."))
    assert not torch.equal(after["model.language_model.layers.0.self_attn.q_proj.weight"],
                           before["model.language_model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(after["model.visual.merger.mlp.0.weight"], before["model.visual.merger.mlp.0.weight"])


def test_llava_1_5_takes_the_budget_fraction_of_its_fixed_image(tmp_path, tiny_deep_dir, tiny_data):
    """Our LLaVA-1.5 has one image size (36 tokens in the tiny tower): the fraction is that share."""
    argv = [
        "--model_name_or_path", tiny_deep_dir, "--data_path", os.path.join(tiny_data, "data.json"),
        "--image_folder", tiny_data, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--lora_r", "4", "--lora_alpha", "8", "--prune_layers", "1,3",
        "--budget_fraction", "0.333", "--use_cpu", "True", "--report_to", "none", "--save_strategy", "no",
    ]
    result = run_training(argv)
    summary = json.loads((tmp_path / "out" / "adsc_training.json").read_text())
    assert summary["target_budget"] == pytest.approx(0.333 * 36)
    assert result.model.vision_schedule().stage_tokens == (36, 15, 6)  # average 12 of 36, as --vision_token_budget 12
    with pytest.raises(InputError, match="give one of --drop_ratio, --vision_token_budget, --budget_fraction, not "
                                         "--vision_token_budget and --budget_fraction"):
        run_training(argv + ["--vision_token_budget", "12"])
