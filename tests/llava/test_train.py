"""Training: the shell recipe on CPU, curriculum phases, resume, what changes, data and bad inputs."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adsc_patch import ScheduleError, solve_drop_ratio
from llava.constants import IGNORE_INDEX
from llava.model.builder import detect_checkpoint_format, load_pretrained_model
from llava.tools.make_tiny_dataset import make_tiny_dataset
from llava.train.curriculum import phase_at, plan_curriculum
from llava.train.data import DataCollatorForSupervisedDataset, DataError, encode_conversation
from llava.train.train import run_training

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "v1_5", "finetune_adsc_lora.sh")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_data")
    make_tiny_dataset(str(folder), samples=36, seed=0)
    return str(folder)


def _run_script(output_dir, model, data, **extra):
    env = dict(
        os.environ,
        MODEL_PATH=model, DATA_PATH=os.path.join(data, "data.json"), IMAGE_FOLDER=data, OUTPUT_DIR=str(output_dir),
        BUDGET="12", PRUNE_LAYERS="1,3", GLOBAL_BATCH="4", PER_DEVICE_BATCH="4", MAX_STEPS="12", LR="2e-3",
        MM_PROJECTOR_LR="2e-3", LORA_R="8", LORA_ALPHA="16", SAVE_STEPS="6", SAVE_TOTAL_LIMIT="2",
        HF_HUB_OFFLINE="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    env.update(extra)
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def script_run(tmp_path_factory, tiny_deep_dir, tiny_data):
    out = tmp_path_factory.mktemp("adsc_lora_run")
    log = _run_script(out, tiny_deep_dir, tiny_data)
    return out, log


def _phase_lines(log):
    return re.findall(r"step (\d+): curriculum phase (\d)/3 from step \d+: budget ([\d.]+) x target = ([\d.]+)", log)


def test_script_runs_the_reverse_curriculum_at_the_right_steps(script_run):
    _, log = script_run
    assert "launcher=python gpus=0" in log
    assert _phase_lines(log) == [("0", "1", "0.8", "9.60"), ("4", "2", "0.9", "10.80"), ("8", "3", "1", "12.00")]


def test_script_loss_goes_down(script_run):
    out, _ = script_run
    losses = json.loads((out / "adsc_training.json").read_text())["train_loss"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


def test_output_loads_and_generates_with_the_trained_schedule(script_run, tiny_deep_dir, random_images):
    from llava.mm_utils import process_images
    from tests.helpers import prompt_ids

    out, _ = script_run
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json"} <= set(
        os.listdir(out)
    )
    tokenizer, model, processor, _ = load_pretrained_model(str(out), model_base=tiny_deep_dir, device="cpu")
    schedule = model.vision_schedule()
    assert model.config.prune_layers == [1, 3] and model.config.conv_mode == "vicuna_v1"
    assert schedule.stage_tokens == (36, 15, 6) and schedule.average_tokens == 12
    pixels = process_images(random_images[:1], processor, model.config)
    with torch.no_grad():
        generated = model.generate(prompt_ids(tokenizer, "What color is the shape?")[None], images=pixels,
                                   max_new_tokens=4, do_sample=False)
    assert generated.shape[1] >= 1
    assert [len(stage[0]) for stage in model.pruning_trace.kept_vision_positions] == [36, 15, 6]
    prompt = prompt_ids(tokenizer, "What color is the shape?")
    assert generated[0].tolist() == _uncached_greedy(model, prompt, pixels, generated.shape[1])
    _assert_adapter_changed_the_language_model(model, tiny_deep_dir)


def _uncached_greedy(model, prompt, pixels, steps):
    """Greedy tokens by hand: each the argmax of one uncached forward over prompt + tokens so far."""
    tokens = []
    for _ in range(steps):
        sequence = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)])[None]
        with torch.no_grad():
            tokens.append(int(model(input_ids=sequence, images=pixels, use_cache=False).logits[0, -1].argmax()))
    return tokens


def _assert_adapter_changed_the_language_model(model, base_dir):
    """Text-only logits (no projector involved) differ from the base's: the LoRA was merged."""
    _, base, _, _ = load_pretrained_model(base_dir, device="cpu")
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        same = torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)
        assert not same, "text-only logits equal the base's: the LoRA adapter was not applied"


def test_resumed_run_continues_in_the_right_phase(script_run, tmp_path, tiny_deep_dir, tiny_data):
    out, _ = script_run
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(out / "checkpoint-6", crashed / "checkpoint-6")  # as if killed after step 6's save
    log = _run_script(crashed, tiny_deep_dir, tiny_data)
    assert "resuming at step 6" in log
    assert _phase_lines(log) == [("6", "2", "0.9", "10.80"), ("8", "3", "1", "12.00")]
    resumed = load_file(str(crashed / "adapter_model.safetensors"))
    uninterrupted = load_file(str(out / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-5, rtol=1e-4)


def _train_in_process(tmp_path, model_dir, data_dir, *extra):
    argv = [
        "--model_name_or_path", model_dir, "--data_path", os.path.join(data_dir, "data.json"),
        "--image_folder", data_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--mm_projector_lr", "1e-2",
        "--lora_r", "4", "--lora_alpha", "8", "--prune_layers", "1,3", "--vision_token_budget", "12",
        "--use_cpu", "True", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
        *extra,
    ]
    return run_training(argv)


def test_lora_mode_changes_only_lora_and_projector_weights(tmp_path, tiny_deep_dir, tiny_data):
    _, base, _, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = _train_in_process(tmp_path, tiny_deep_dir, tiny_data)
    after = result.trainer.model.state_dict()  # the PEFT model, not merged
    changed_lora = changed_projector = 0
    for key, value in after.items():
        plain = key.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in key:
            changed_lora += int(not torch.all(value == 0))  # B starts at zero
            continue
        if "modules_to_save" in key:
            original = plain.replace(".modules_to_save.default", "")
            changed_projector += int(not torch.equal(value, before[original]))
            continue
        plain = plain.replace(".original_module", "")
        assert torch.equal(value, before[plain]), f"{plain} changed in LoRA mode"
    assert changed_lora > 0 and changed_projector == 4  # 2 linear layers x (weight, bias)
    assert not any("vision_tower" in k and "lora_" in k for k in after)


def test_full_mode_trains_the_language_model_but_not_the_tower(tmp_path, tiny_deep_dir, tiny_data):
    _, base, _, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = _train_in_process(tmp_path, tiny_deep_dir, tiny_data, "--finetune_mode", "full")
    after = result.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if "vision_tower" in k)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    _, loaded, _, _ = load_pretrained_model(str(tmp_path / "out"), device="cpu")
    assert torch.equal(loaded.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       after["model.layers.0.self_attn.q_proj.weight"])


def test_curriculum_none_trains_on_all_tokens(tmp_path, tiny_deep_dir, tiny_data):
    argv = ["--finetune_mode", "full", "--curriculum", "none", "--prune_layers", "", "--vision_token_budget", "36"]
    with pytest.raises(ValueError, match="--curriculum none trains on all vision tokens"):
        _train_in_process(tmp_path, tiny_deep_dir, tiny_data, *argv)
    argv = ["--finetune_mode", "full", "--curriculum", "none"]
    result = _train_in_process_without_target(tmp_path, tiny_deep_dir, tiny_data, *argv)
    assert result.model.config.prune_layers == [] and not result.model.vision_schedule().enabled
    assert result.model.pruning_trace is None  # no pruned forward ran during training
    summary = json.loads((tmp_path / "out" / "adsc_training.json").read_text())
    assert summary["curriculum"] == [] and len(summary["train_loss"]) == 3


def _train_in_process_without_target(tmp_path, model_dir, data_dir, *extra):
    argv = [
        "--model_name_or_path", model_dir, "--data_path", os.path.join(data_dir, "data.json"),
        "--image_folder", data_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--use_cpu", "True", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1", *extra,
    ]
    return run_training(argv)


def test_projector_has_its_own_learning_rate(tmp_path, tiny_deep_dir, tiny_data):
    result = _train_in_process(tmp_path, tiny_deep_dir, tiny_data, "--mm_projector_lr", "5e-4")
    groups = result.trainer.optimizer.param_groups
    projector_params = {id(p) for n, p in result.trainer.model.named_parameters() if "mm_projector" in n and p.requires_grad}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        if ids & projector_params:
            assert ids <= projector_params and group["initial_lr"] == 5e-4
        else:
            assert group["initial_lr"] == 1e-2


def test_merge_lora_weights_script(script_run, tiny_deep_dir, tmp_path, random_images):
    from llava.mm_utils import process_images
    from tests.helpers import prompt_ids

    out, _ = script_run
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "merge_lora_weights.py"), "--model-path", str(out),
                    "--model-base", tiny_deep_dir, "--save-model-path", str(merged)], check=True, cwd=ROOT,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    tok_a, lora, proc, _ = load_pretrained_model(str(out), model_base=tiny_deep_dir, device="cpu")
    tok_b, full, _, _ = load_pretrained_model(str(merged), device="cpu")
    ids = prompt_ids(tok_a, "What color is the shape?")[None]
    pixels = process_images(random_images[:1], proc, lora.config)
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids, images=pixels).logits, lora(input_ids=ids, images=pixels).logits)


# ------------------------------------------------------------------------------ curriculum
def _solve_7b(budget):
    return solve_drop_ratio(32, 576, [2, 6, 12, 20], budget)


def test_phases_split_steps_into_equal_thirds_and_solve_each_budget():
    phases = plan_curriculum(192, (0.8, 0.9, 1.0), (1 / 3, 1 / 3, 1 / 3), 10, _solve_7b)
    assert [p.start_step for p in phases] == [0, 3, 7]
    assert [round(p.budget, 1) for p in phases] == [153.6, 172.8, 192.0]
    assert all(abs(p.schedule.average_tokens - p.budget) <= 1 for p in phases)
    assert [phase_at(phases, s).index for s in range(10)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_standard_and_direct_curricula_and_infeasible_budgets():
    standard = plan_curriculum(192, (1.2, 1.1, 1.0), (0.5, 0.25, 0.25), 8, _solve_7b)
    assert [p.start_step for p in standard] == [0, 4, 6] and standard[0].budget > standard[-1].budget
    direct = plan_curriculum(64, (1.0,), (1.0,), 8, _solve_7b)
    assert len(direct) == 1 and phase_at(direct, 7).budget == 64
    with pytest.raises(ScheduleError, match="below what prune layers"):
        plan_curriculum(40, (0.8, 0.9, 1.0), (1 / 3,) * 3, 9, _solve_7b)


# ------------------------------------------------------------------------------ data
def test_only_assistant_replies_are_targets(loaded_tiny):
    tokenizer = loaded_tiny[0]
    record = {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "What color?\n<image>"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And shape?"}, {"from": "gpt", "value": "A circle."}]}
    sample = encode_conversation(record, tokenizer, "v1")
    targets = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    assert tokenizer.decode(targets) .replace(" ", "") == "Red.</s>Acircle.</s>"
    assert sample.input_ids.tolist().count(-200) == 1
    assert sample.input_ids[1:].tolist().index(-200) < 40  # the image was moved to the front of the turn
    assert (sample.labels == IGNORE_INDEX).sum() > 0 and sample.labels[0] == IGNORE_INDEX


def test_plain_template_targets_the_caption(loaded_tiny):
    tokenizer = loaded_tiny[0]
    record = {"id": "p", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A red ball"}]}
    sample = encode_conversation(record, tokenizer, "plain")
    assert sample.input_ids[1] == -200
    targets = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    assert tokenizer.decode(targets).strip() == "A red ball"


def test_collator_right_pads_and_lists_images_in_row_order():
    collate = DataCollatorForSupervisedDataset(pad_token_id=0)
    batch = collate([
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6]), "image": torch.ones(3, 4, 4)},
        {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7])},
        {"input_ids": torch.tensor([1]), "labels": torch.tensor([-100]), "image": torch.zeros(3, 4, 4)},
    ])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0], [1, 0, 0]]
    assert batch["labels"][1].tolist() == [-100, 7, -100]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert batch["images"].shape == (2, 3, 4, 4) and batch["images"][0].sum() > 0


def test_modality_grouped_batches_never_mix_images_and_text():
    from llava.train.trainer import ModalityLengthGroupedSampler

    lengths = [10, -5, 30, -7, 12, 40, -3, 25, 8]  # 6 with an image, 3 text only
    order = list(ModalityLengthGroupedSampler(lengths, batch_size=2, seed=1))
    assert sorted(order) == list(range(9))
    for i in range(0, 8, 2):  # every full batch has one modality; the leftover comes last
        assert len({lengths[j] > 0 for j in order[i:i + 2]}) == 1
    assert lengths[order[-1]] < 0


def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return str(path)


def test_missing_image_names_the_sample_or_is_skipped_with_a_count(tmp_path, tiny_deep_dir, tiny_data):
    records = json.load(open(os.path.join(tiny_data, "data.json")))
    records[0]["image"] = "images/nope.png"
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    _write(data, records)
    with pytest.raises(DataError, match=r"sample 'shape-0' \(#0\): image file not found: .*nope.png"):
        _train_in_process(tmp_path, tiny_deep_dir, str(data))
    result = _train_in_process(tmp_path, tiny_deep_dir, str(data), "--skip_missing_images", "True")
    assert result.dataset.skipped == ["sample 'shape-0' (#0)"] and len(result.dataset) == 35


@pytest.mark.parametrize("content, message", [
    ('[{"id": 1, "conversations": [}', "not valid JSON"),
    ([{"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "Hi"},
                                                      {"from": "gpt", "value": "Yo"}]}],
     "has an image but 0 <image> markers"),
    ([{"id": "b", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]}],
     "marker\\(s\\) but no 'image'"),
    ([{"id": "c", "conversations": [{"from": "gpt", "value": "Yo"}]}], "must alternate"),
])
def test_bad_data_files_are_refused_with_the_sample_named(tmp_path, tiny_deep_dir, content, message):
    data = tmp_path / "bad"
    data.mkdir()
    _write(data, content)
    (data / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=message):
        _train_in_process(tmp_path, tiny_deep_dir, str(data))


def test_infeasible_budget_is_refused_before_training(tmp_path, tiny_deep_dir, tiny_data):
    with pytest.raises(ScheduleError, match="infeasible for this model: .*above the 36"):
        _train_in_process(tmp_path, tiny_deep_dir, tiny_data, "--vision_token_budget", "40")
    with pytest.raises(ScheduleError, match="infeasible for this model: .*below what prune layers"):
        _train_in_process(tmp_path, tiny_deep_dir, tiny_data, "--vision_token_budget", "2")


def test_deepspeed_zero3_single_process_on_cpu(tmp_path, tiny_deep_dir, tiny_data):
    """The recipe's ZeRO-3 config: partitioned towers load, train, gather and save."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "llava.train.train", "--model_name_or_path", tiny_deep_dir,
           "--data_path", os.path.join(tiny_data, "data.json"), "--image_folder", tiny_data, "--output_dir", str(out),
           "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--lora_r", "4",
           "--lora_alpha", "8", "--prune_layers", "1,3", "--vision_token_budget", "12", "--use_cpu", "True",
           "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
           "--deepspeed", os.path.join(ROOT, "scripts", "zero3.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "adsc_training.json").read_text())
    assert len(summary["train_loss"]) == 3
    _, model, _, _ = load_pretrained_model(str(out), model_base=tiny_deep_dir, device="cpu")
    assert model.vision_schedule().average_tokens == 12
    projector = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert all(v.numel() > 0 for v in projector.values())  # gathered, not ZeRO-3 shards


def test_a_seed_makes_a_lora_fine_tune_reproducible(tmp_path, tiny_deep_dir, tiny_data):
    """LoRA adapters are initialised before the Trainer seeds: the seed must come first."""
    def adapters(folder, seed):
        torch.manual_seed(1000 + len(folder))  # whatever the caller's RNG state, the seed decides
        _train_in_process(tmp_path / folder, tiny_deep_dir, tiny_data, "--seed", str(seed))
        return load_file(str(tmp_path / folder / "out" / "adapter_model.safetensors"))

    first, again, other = adapters("a", 7), adapters("bb", 7), adapters("ccc", 8)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("method, budget, stages", [("pdrop", "12", (36, 15, 6)), ("tome", "24", (36, 24))])
def test_a_baseline_fine_tunes_through_the_recipe_with_the_same_curriculum(tmp_path, tiny_deep_dir, tiny_data,
                                                                           method, budget, stages):
    layers = "1,3" if method == "pdrop" else ""  # tome acts in the tower: no prune layers
    log = _run_script(tmp_path, tiny_deep_dir, tiny_data, PRUNE_METHOD=method, PRUNE_LAYERS=layers, BUDGET=budget,
                      MAX_STEPS="6", SAVE_STEPS="100")
    phases = _phase_lines(log)
    assert [p[:3] for p in phases] == [("0", "1", "0.8"), ("2", "2", "0.9"), ("4", "3", "1")]
    losses = json.loads((tmp_path / "adsc_training.json").read_text())["train_loss"]
    assert len(losses) == 6 and all(loss == loss for loss in losses)  # finite: the pruned loss trains
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)  # no inf either; cross-entropy is > 0
    _, model, _, _ = load_pretrained_model(str(tmp_path), model_base=tiny_deep_dir, device="cpu")
    assert model.config.prune_method == method
    assert model.vision_schedule().stage_tokens == stages


def test_the_scripts_header_example_runs_as_written(tmp_path):
    """The commented example at the top of finetune_adsc_lora.sh, copied out of the script and
    run in an empty folder with the repository's own tiny tools."""
    with open(SCRIPT) as f:
        header = f.read().split("set -euo pipefail")[0]
    example = header.split("as written here:\n")[1]
    lines = [line.removeprefix("#   ") for line in example.splitlines() if line.startswith("#   ")]
    commands = "\n".join(lines).replace("scripts/v1_5/finetune_adsc_lora.sh", SCRIPT)
    assert "make_tiny_checkpoint" in commands and "make_tiny_dataset" in commands and SCRIPT in commands
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert detect_checkpoint_format(str(tmp_path / "out")) == "lora"


def test_a_target_that_cannot_be_a_pruning_spec_is_refused_before_the_model_loads(tmp_path, tiny_data):
    """The training flags read into one ``PruningSpec`` (``AdscArguments.spec``): FastV at two
    layers, or a pre-LLM method given layers, end in one line naming the flags before anything
    is loaded (the model path does not even exist)."""
    from llava.cli import InputError

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(InputError, match=r"--prune_method.*fastv drops once"):
        _train_in_process(tmp_path, missing, tiny_data, "--prune_method", "fastv")  # layers 1,3 from the helper
    with pytest.raises(InputError, match=r"--prune_method.*pool .*takes no prune layers"):
        _train_in_process(tmp_path, missing, tiny_data, "--prune_method", "pool")
