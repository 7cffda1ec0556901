"""Benchmark inference: batching, resume after a crash, settings, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llava.eval import model_vqa_loader, model_vqa_science
from llava.eval.inference import get_chunk
from llava.eval.io import EvalInputError, read_jsonl
from llava.tools.make_tiny_benchmarks import make_tiny_benchmarks

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_tiny_benchmarks(str(tmp_path_factory.mktemp("eval")), per_benchmark=4)


def _pope_args(model, bench, answers, *extra):
    return ["--model-path", model, "--question-file", f"{bench}/pope/llava_pope_test.jsonl",
            "--image-folder", f"{bench}/pope/val2014", "--answers-file", str(answers), "--temperature", "0",
            "--max_new_tokens", "6", "--device", "cpu", "--num-workers", "0", *extra]


def _texts(path):
    return [(r["question_id"], r["prompt"], r["text"], r["answer_id"]) for r in read_jsonl(str(path))]


def test_batch_of_four_answers_like_batch_of_one(tiny_deep_dir, bench, tmp_path):
    pruning = ["--prune-layers", "1,3", "--vision-token-budget", "12"]
    one = model_vqa_loader.main(_pope_args(tiny_deep_dir, bench, tmp_path / "b1.jsonl", "--batch-size", "1", *pruning))
    four = model_vqa_loader.main(_pope_args(tiny_deep_dir, bench, tmp_path / "b4.jsonl", "--batch-size", "4", *pruning))
    assert _texts(one) == _texts(four) and len(_texts(one)) == 12
    record = read_jsonl(four)[0]
    assert set(record) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    settings = json.loads(open(four + ".settings.json").read())
    assert settings["pruning"]["vision_tokens_per_stage"] == [36, 15, 6]
    assert settings["pruning"]["average_vision_tokens"] == 12.0 and settings["answered"] == 12


def test_killed_run_resumes_to_the_same_file(tiny_deep_dir, bench, tmp_path):
    full = model_vqa_loader.main(_pope_args(tiny_deep_dir, bench, tmp_path / "full.jsonl"))
    killed = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "llava.eval.model_vqa_loader", *_pope_args(tiny_deep_dir, bench, killed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if killed.exists() and killed.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed.read_text().count("\n") < 12, "the run finished before it could be killed"
    with open(killed, "a") as f:
        f.write('{"question_id": 99, "prompt": "cut sho')  # a line cut in the middle by the crash
    model_vqa_loader.main(_pope_args(tiny_deep_dir, bench, killed))
    assert killed.read_text() == open(full).read()


def test_other_settings_are_refused_on_resume(tiny_deep_dir, bench, tmp_path):
    answers = tmp_path / "a.jsonl"
    model_vqa_loader.main(_pope_args(tiny_deep_dir, bench, answers, "--num-chunks", "3", "--chunk-idx", "0"))
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(EvalInputError, match="other settings \\(pruning differ"):
        model_vqa_loader.main(_pope_args(tiny_deep_dir, bench, answers, "--num-chunks", "3", "--chunk-idx", "0",
                                         "--prune-layers", "1", "--drop-ratio", "0.5"))


def test_missing_image_is_named_or_recorded(tiny_deep_dir, bench, tmp_path):
    questions = read_jsonl(f"{bench}/pope/llava_pope_test.jsonl")[:3]
    questions[1]["image"] = "nope.jpg"
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    args = ["--model-path", tiny_deep_dir, "--question-file", str(qfile), "--image-folder", f"{bench}/pope/val2014",
            "--temperature", "0", "--max_new_tokens", "3", "--device", "cpu", "--num-workers", "0"]
    with pytest.raises(EvalInputError, match="question 2: .*nope.jpg"):
        model_vqa_loader.main(args + ["--answers-file", str(tmp_path / "a.jsonl")])
    out = model_vqa_loader.main(args + ["--answers-file", str(tmp_path / "b.jsonl"), "--on-missing-image", "record"])
    records = {r["question_id"]: r for r in read_jsonl(out)}
    assert len(records) == 3 and "nope.jpg" in records[2]["metadata"]["error"] and records[2]["text"] == ""


def test_science_loader_builds_upstream_prompts(tiny_deep_dir, bench, tmp_path):
    out = model_vqa_science.main([
        "--model-path", tiny_deep_dir, "--question-file", f"{bench}/scienceqa/llava_test_CQM-A.json",
        "--image-folder", f"{bench}/scienceqa/images/test", "--answers-file", str(tmp_path / "sqa.jsonl"),
        "--single-pred-prompt", "--temperature", "0", "--max_new_tokens", "3", "--device", "cpu",
        "--num-workers", "0", "--batch-size", "2",
    ])
    records = read_jsonl(out)
    assert len(records) == 4
    with_image = [r for r in records if r["prompt"].startswith("<image>\n")]
    assert len(with_image) == 3
    assert all(r["prompt"].endswith("\nAnswer with the option's letter from the given choices directly.") for r in records)


def test_chunks_are_contiguous_and_cover_everything():
    items = list(range(10))
    chunks = [get_chunk(items, 3, i) for i in range(3)]
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="chunk-idx 3"):
        get_chunk(items, 3, 3)


def test_prompt_batch_is_left_padded_chat_prompts_with_one_image_each(loaded_tiny, bench):
    from argparse import Namespace

    from llava.eval.inference import prompt_batch
    from llava.eval.run_llava import build_prompt
    from llava.mm_utils import tokenizer_image_token

    tokenizer, model, processor, _ = loaded_tiny
    questions = model_vqa_loader.load_questions(Namespace(question_file=f"{bench}/pope/llava_pope_test.jsonl"))[:3]
    questions[1].query = questions[1].query + " Think about it carefully, please."  # a longer prompt
    input_ids, mask, pixels = prompt_batch(questions, tokenizer, processor, model.config, f"{bench}/pope/val2014",
                                           "vicuna_v1")
    assert pixels.shape[0] == 3 and input_ids.shape == mask.shape
    for row, question in enumerate(questions):
        expected = tokenizer_image_token(build_prompt(question.query, "vicuna_v1", False), tokenizer, return_tensors="pt")
        assert int(mask[row].sum()) == len(expected) and mask[row, -len(expected):].all()
        assert input_ids[row, -len(expected):].tolist() == expected.tolist()
    assert not mask[0, 0] and mask[1].all()  # shorter rows are padded on the left
