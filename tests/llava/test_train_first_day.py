"""What a first training run meets: upstream's entry points and flags, one-line errors, the
attention implementation, and checkpoints every so many minutes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from llava.cli import InputError, MissingDependencyError
from llava.train.data import DataError
from llava.train.train import main, resolve_attention, run_training
from llava.train.trainer import SaveEveryMinutesCallback

# compat: meets the Trainer's callbacks and checkpoints
pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("one_thread")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _argv(out, model_dir, data_dir, *extra, steps="1"):
    return [
        "--model_name_or_path", model_dir, "--data_path", os.path.join(data_dir, "data.json"),
        "--image_folder", data_dir, "--output_dir", str(out), "--max_steps", steps,
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--mm_projector_lr", "1e-2",
        "--lora_r", "4", "--lora_alpha", "8", "--prune_layers", "1,3", "--vision_token_budget", "12",
        "--use_cpu", "True", "--report_to", "none", "--logging_steps", "1", *extra,
    ]


# ------------------------------------------------------------------------------ upstream's entry points
def _upstream_flags(model_dir, data_dir, out):
    """scripts/v1_5/finetune_lora.sh of upstream LLaVA, sized for the tiny model on a CPU."""
    return [
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-3",
        "--model_name_or_path", model_dir, "--version", "v1",
        "--data_path", os.path.join(data_dir, "data.json"), "--image_folder", data_dir,
        "--vision_tower", os.path.join(model_dir, "vision_tower"), "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--group_by_modality_length", "True", "--bf16", "False",
        "--output_dir", out, "--num_train_epochs", "1", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "50000", "--save_total_limit", "1", "--learning_rate", "2e-3",
        "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--model_max_length", "2048", "--gradient_checkpointing", "True", "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True", "--report_to", "none", "--use_cpu", "True",
    ]


@pytest.fixture(scope="module")
def entry_runs(tmp_path_factory, tiny_deep_dir, tiny_data):
    """Three commands started together (most of each is importing torch): upstream's train.py
    with the curriculum off, train_mem.py with a budget, and one with a missing data file."""
    root = tmp_path_factory.mktemp("entry_points")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    commands = {
        "train": [sys.executable, "llava/train/train.py",
                  *_upstream_flags(tiny_deep_dir, tiny_data, str(root / "train")), "--curriculum", "none"],
        "train_mem": [sys.executable, "llava/train/train_mem.py",
                      *_upstream_flags(tiny_deep_dir, tiny_data, str(root / "train_mem")),
                      "--prune_layers", "1,3", "--vision_token_budget", "12"],
        "bad_data": [sys.executable, "-m", "llava.train.train", "--model_name_or_path", tiny_deep_dir,
                     "--data_path", str(root / "missing.json"), "--output_dir", str(root / "bad")],
    }
    running = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, cmd in commands.items()}
    done = {}
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=600)
        done[name] = (proc.returncode, stdout, stderr, root / name)
    return done


def _trained(run, steps=2):
    rc, stdout, stderr, out = run
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"} <= set(os.listdir(out))
    summary = json.loads((out / "adsc_training.json").read_text())
    assert len(summary["train_loss"]) == steps
    return summary, stdout + stderr


def test_upstream_train_py_runs_as_a_script_with_upstream_flags(entry_runs):
    summary, log = _trained(entry_runs["train"])
    assert summary["curriculum"] == [] and "no curriculum: training on all vision tokens" in log
    # upstream's --gradient_checkpointing and a LoRA set up through peft: no deprecation noise
    assert "FutureWarning" not in log and "is deprecated" not in log
    assert json.loads((entry_runs["train"][3] / "config.json").read_text())["prune_layers"] == []


def test_train_mem_py_falls_back_to_sdpa_without_flash_attn(entry_runs):
    summary, log = _trained(entry_runs["train_mem"])
    assert "attention: sdpa (flash_attention_2 needs the flash-attn package)" in log
    assert len(summary["curriculum"]) == 3 and summary["target_budget"] == 12


def test_upstreams_gradient_checkpointing_flag_is_taken_under_transformers_new_name_without_a_warning(tmp_path):
    import warnings

    from llava.train.train import parse_args

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, _, training, _ = parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--use_cpu",
                                        "True", "--gradient_checkpointing", "True", "--report_to", "none"])
    assert training.activation_checkpointing is True and training.gradient_checkpointing is True


def test_bad_input_ends_the_command_with_one_error_line_and_exit_code_2(entry_runs):
    rc, stdout, stderr, _ = entry_runs["bad_data"]
    assert rc == 2, stdout[-2000:] + stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: data file not found: ")
    assert "Traceback" not in stderr + stdout


def test_a_bare_debug_shows_the_traceback_instead(tmp_path, tiny_deep_dir, capsys):
    argv = ["--model_name_or_path", tiny_deep_dir, "--data_path", str(tmp_path / "no.json"),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: data file not found: {tmp_path / 'no.json'}")
    with pytest.raises(DataError, match="data file not found"):
        main([*argv, "--debug"])
    with pytest.raises(InputError, match="unrecognised arguments: --no_such_flag 1"):
        main([*argv, "--no_such_flag", "1", "--debug"])


def test_without_a_budget_the_message_offers_curriculum_none(tmp_path, tiny_deep_dir, tiny_data):
    argv = [a for a in _argv(tmp_path / "out", tiny_deep_dir, tiny_data, "--save_strategy", "no")
            if a not in ("--prune_layers", "1,3", "--vision_token_budget", "12")]
    with pytest.raises(InputError, match=r"give --vision_token_budget \(e.g. 192\) or --drop_ratio.*"
                                         r"--curriculum none to train on all vision tokens"):
        run_training(argv)


# ------------------------------------------------------------------------------ attention
def test_the_chosen_attention_implementation_is_the_one_trained(tmp_path, tiny_deep_dir, tiny_data):
    result = run_training(_argv(tmp_path / "out", tiny_deep_dir, tiny_data, "--save_strategy", "no",
                                "--attn_implementation", "eager"))
    assert result.model.config._attn_implementation == "eager"
    assert result.model.model.layers[0].self_attn.config._attn_implementation == "eager"
    assert not any(isinstance(c, SaveEveryMinutesCallback) for c in result.trainer.callback_handler.callbacks)


def test_flash_attention_2_is_refused_without_flash_attn(tmp_path, tiny_deep_dir, tiny_data, caplog):
    with pytest.raises(MissingDependencyError, match="flash_attention_2 needs the flash-attn package"):
        run_training(_argv(tmp_path / "out", tiny_deep_dir, tiny_data, "--attn_implementation", "flash_attention_2"))
    with pytest.raises(InputError, match="--attn_implementation must be one of eager, sdpa, flash_attention_2"):
        run_training(_argv(tmp_path / "out", tiny_deep_dir, tiny_data, "--attn_implementation", "flash"))
    caplog.set_level("INFO")
    assert resolve_attention(None, "flash_attention_2", cuda=True) == "sdpa"  # train_mem's default falls back
    assert "attention: sdpa (flash_attention_2 needs the flash-attn package)" in caplog.text
    assert resolve_attention(None) == "sdpa" and resolve_attention("eager", "flash_attention_2") == "eager"


# ------------------------------------------------------------------------------ checkpoints by the clock
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_save_is_asked_for_when_the_minutes_are_up_counting_from_the_last_save():
    clock = _Clock()
    callback = SaveEveryMinutesCallback(30, clock=clock)
    args, state = type("Args", (), {"device": torch.device("cpu")})(), TrainerState()
    callback.on_train_begin(args, state, TrainerControl())

    def step(minutes):
        clock.now = minutes * 60
        control = TrainerControl()
        callback.on_step_end(args, state, control)
        if control.should_save:
            callback.on_save(args, state, control)
        return control.should_save

    assert [step(m) for m in (10, 29.9, 30, 45, 59, 61)] == [False, False, True, False, False, True]
    clock.now = 70 * 60
    callback.on_save(args, state, TrainerControl())  # a step-based save restarts the count
    assert [step(m) for m in (95, 100)] == [False, True]


def test_time_based_checkpoints_appear_and_a_run_resumes_from_one(tmp_path, tiny_deep_dir, tiny_data, caplog):
    flags = ("--save_strategy", "steps", "--save_steps", "100000", "--save_every_minutes", "1e-6", "--seed", "3")
    first = run_training(_argv(tmp_path / "a", tiny_deep_dir, tiny_data, *flags, steps="3"))
    assert first.model.config._attn_implementation == "sdpa"  # the default
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]  # 1 and 2 by the clock (save_steps is 100000)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-1")  # as if killed after it
    caplog.set_level("INFO")
    resumed = run_training(_argv(tmp_path / "b", tiny_deep_dir, tiny_data, *flags, steps="3"))
    assert "resuming at step 1" in caplog.text and resumed.trainer.state.global_step == 3
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
