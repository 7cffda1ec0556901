"""What a first real evaluation meets: bad questions under each policy, empty inputs, answers
of a retrained model, one-line errors, pruning flags without layers, 4/8-bit loading."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from adsc_patch import default_prune_layers
from llava.eval import model_vqa_loader
from llava.eval.io import EvalInputError, read_jsonl
from llava.model.fingerprint import weights_fingerprint
from llava.tools.make_tiny_benchmarks import make_tiny_benchmarks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_tiny_benchmarks(str(tmp_path_factory.mktemp("eval")), per_benchmark=4)


def _questions(bench, tmp_path, edit=None, name="q.jsonl"):
    questions = read_jsonl(f"{bench}/pope/llava_pope_test.jsonl")[:4]
    if edit:
        edit(questions)
    path = tmp_path / name
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return questions, str(path)


def _args(model, qfile, images, answers, *extra):
    return ["--model-path", model, "--question-file", qfile, "--image-folder", images, "--answers-file", str(answers),
            "--temperature", "0", "--max_new_tokens", "3", "--device", "cpu", "--num-workers", "0", *extra]


def _cut(source, target):
    data = open(source, "rb").read()
    with open(target, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.fixture()
def bad_questions(bench, tmp_path):
    """Four questions: 1 fine, 2 with an <image> marker in its text, 3 a cut PNG (caught by
    the up-front check), 4 a cut JPEG (passes the check, fails to decode in the loop)."""
    images = tmp_path / "images"
    shutil.copytree(f"{bench}/pope/val2014", images)
    questions = read_jsonl(f"{bench}/pope/llava_pope_test.jsonl")[:4]
    from PIL import Image

    with Image.open(images / questions[2]["image"]) as image:
        image.convert("RGB").save(images / "whole.png")
        image.convert("RGB").save(images / "whole.jpg", quality=95)
    _cut(images / "whole.png", images / "cut.png")
    _cut(images / "whole.jpg", images / "cut.jpg")
    questions[1]["text"] = "<image>\n" + questions[1]["text"]
    questions[2]["image"] = "cut.png"
    questions[3]["image"] = "cut.jpg"
    qfile = tmp_path / "bad.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return [q["question_id"] for q in questions], str(qfile), str(images)


def test_bad_questions_stop_before_generating_by_default_naming_each(tiny_deep_dir, bad_questions, tmp_path):
    ids, qfile, images = bad_questions
    answers = tmp_path / "a.jsonl"
    with pytest.raises(EvalInputError) as error:
        model_vqa_loader.main(_args(tiny_deep_dir, qfile, images, answers))
    message = str(error.value)
    assert f"question {ids[1]!r}: its text has 1 <image> marker" in message
    assert f"question {ids[2]!r}: not a readable image" in message and "cut.png" in message
    assert "--on-bad-question record|skip" in message
    assert not answers.exists()  # nothing generated, no model loaded


def test_an_image_that_fails_only_when_decoded_stops_the_run_with_its_id_keeping_earlier_answers(
        tiny_deep_dir, bad_questions, tmp_path):
    ids, qfile, images = bad_questions
    questions = read_jsonl(qfile)
    only = tmp_path / "only.jsonl"
    only.write_text("".join(json.dumps(q) + "\n" for q in (questions[0], questions[3])))
    answers = tmp_path / "a.jsonl"
    with pytest.raises(EvalInputError, match=rf"question {ids[3]!r}: not a readable image: .*cut.jpg"):
        model_vqa_loader.main(_args(tiny_deep_dir, str(only), images, answers))
    assert [r["question_id"] for r in read_jsonl(str(answers))] == [ids[0]]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_record_policy_writes_one_line_per_bad_question_with_its_problem(tiny_deep_dir, bad_questions, tmp_path,
                                                                         workers):
    ids, qfile, images = bad_questions
    out = model_vqa_loader.main(_args(tiny_deep_dir, qfile, images, tmp_path / "a.jsonl", "--on-bad-question",
                                      "record", "--num-workers", workers, "--batch-size", "2"))
    records = {r["question_id"]: r for r in read_jsonl(out)}
    assert sorted(records, key=ids.index) == ids
    assert "error" not in records[ids[0]]["metadata"] and records[ids[0]]["text"]
    assert "<image> marker" in records[ids[1]]["metadata"]["error"]
    assert "cut.png" in records[ids[2]]["metadata"]["error"] and "cut.jpg" in records[ids[3]]["metadata"]["error"]
    assert all(records[i]["text"] == "" for i in ids[1:])
    # the old flag name means the same
    again = model_vqa_loader.main(_args(tiny_deep_dir, qfile, images, tmp_path / "b.jsonl", "--on-missing-image",
                                        "record"))
    assert len(read_jsonl(again)) == 4


def test_skip_policy_answers_only_the_good_questions(tiny_deep_dir, bad_questions, tmp_path, caplog):
    ids, qfile, images = bad_questions
    with caplog.at_level(logging.WARNING):
        out = model_vqa_loader.main(_args(tiny_deep_dir, qfile, images, tmp_path / "a.jsonl", "--on-bad-question",
                                          "skip"))
    assert [r["question_id"] for r in read_jsonl(out)] == [ids[0]]
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 3


def test_empty_question_file_and_empty_chunk_are_errors(tiny_deep_dir, bench, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    images = f"{bench}/pope/val2014"
    with pytest.raises(EvalInputError, match="holds no questions"):
        model_vqa_loader.main(_args(tiny_deep_dir, str(empty), images, tmp_path / "a.jsonl"))
    _, qfile = _questions(bench, tmp_path)
    with pytest.raises(EvalInputError, match="chunk 5 of 6 is empty: .* has only 4 questions"):
        model_vqa_loader.main(_args(tiny_deep_dir, qfile, images, tmp_path / "b.jsonl", "--num-chunks", "6",
                                    "--chunk-idx", "5"))
    assert not (tmp_path / "b.jsonl").exists()


def _perturb_weights(folder):
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, path, metadata={"format": "pt"})


def test_answers_of_a_retrained_model_are_refused_and_overwrite_starts_afresh(tiny_deep_dir, bench, tmp_path):
    model = tmp_path / "ckpt"
    shutil.copytree(tiny_deep_dir, model)
    _, qfile = _questions(bench, tmp_path)
    answers = tmp_path / "a.jsonl"
    args = _args(str(model), qfile, f"{bench}/pope/val2014", answers)
    model_vqa_loader.main(args)
    first = answers.read_text()
    lines = first.splitlines()
    answers.write_text("\n".join(lines[:2]) + "\n")  # half done, then the model is retrained into its folder
    _perturb_weights(model)
    with pytest.raises(EvalInputError, match="answers of other weights: the model at .*ckpt changed .*--overwrite"):
        model_vqa_loader.main(args)
    assert answers.read_text().count("\n") == 2  # left as it was

    model_vqa_loader.main(args + ["--overwrite"])
    records = read_jsonl(str(answers))
    assert len(records) == 4
    settings = json.loads((tmp_path / "a.jsonl.settings.json").read_text())
    assert settings["weights_fingerprint"] == {"model": weights_fingerprint(str(model))}
    # a resume with the same weights goes on (and a settings file of an older release, without a
    # fingerprint, is resumed as before)
    answers.write_text("\n".join(answers.read_text().splitlines()[:3]) + "\n")
    del settings["weights_fingerprint"]
    (tmp_path / "a.jsonl.settings.json").write_text(json.dumps(settings))
    model_vqa_loader.main(args)
    assert len(read_jsonl(str(answers))) == 4


def test_fingerprint_sees_new_values_in_big_files_but_not_a_copy(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    weights = {"w": torch.arange(1_000_000, dtype=torch.float32)}  # 4 MB: sampled, not hashed whole
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    before = weights_fingerprint(str(folder))
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copy)  # new times, same bytes
    assert weights_fingerprint(str(copy)) == before
    save_file({"w": weights["w"] * 1.001}, str(folder / "model.safetensors"))  # retrained: same shapes
    assert weights_fingerprint(str(folder)) != before
    (copy / "config.json").write_text('{"prune_layers": [2]}')
    assert weights_fingerprint(str(copy)) != before


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)


def test_command_lines_end_bad_input_in_one_line_and_exit_code_2(tiny_deep_dir, bench, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te\n{"question_id": 3, "text": "c"}\n')
    cases = [
        ("llava.eval.model_vqa_loader", _args(tiny_deep_dir, str(broken), "", tmp_path / "a.jsonl"),
         "broken.jsonl:2 is not valid JSON"),
        ("llava.eval.run_llava", ["--model-path", tiny_deep_dir, "--image-file", str(tmp_path / "nope.png"),
                                  "--query", "hi", "--device", "cpu"], "image file not found"),
        ("llava.eval.eval_pope", ["--annotation-dir", str(tmp_path), "--question-file", str(broken),
                                  "--result-file", str(tmp_path / "none.jsonl")], "broken.jsonl:2 is not valid JSON"),
    ]
    image = tmp_path / "grid.png"
    Image.new("RGB", (40, 40), "white").save(image)
    run = ["--model-path", tiny_deep_dir, "--image-file", str(image), "--device", "cpu"]
    cases += [  # each was a traceback, a silent ignore or an answer to nothing before
        ("llava.eval.run_llava", [*run, "--query", "hi", "--attn-implementation", "flash_attention_2"],
         "--attn-implementation flash_attention_2 needs the flash-attn package"),
        ("llava.eval.run_llava", [*run, "--query", "hi", "--no-pruning", "--vision-token-budget", "12"],
         "--no-pruning runs on all vision tokens and cannot be combined with --vision-token-budget"),
        ("llava.eval.run_llava", [*run, "--query", " "], "--query is empty"),
    ]
    for module, args, expected in cases:
        done = _cli(module, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (module, done.stderr[-2000:])
        assert lines[-1].startswith("error: ") and expected in lines[-1], (module, lines[-3:])
        assert "Traceback" not in done.stderr, module
    debug = _cli("llava.eval.model_vqa_loader", *cases[0][1], "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "EvalInputError" in debug.stderr


def test_a_ratio_without_prune_layers_uses_the_default_layers(tiny_deep_dir, bench, tmp_path, caplog):
    _, qfile = _questions(bench, tmp_path)
    with caplog.at_level(logging.INFO):
        out = model_vqa_loader.main(_args(tiny_deep_dir, qfile, f"{bench}/pope/val2014", tmp_path / "a.jsonl",
                                          "--drop-ratio", "0.5"))
    settings = json.loads(open(out + ".settings.json").read())
    layers = list(default_prune_layers(8))
    assert settings["pruning"]["prune_layers"] == layers and layers
    assert settings["pruning"]["vision_tokens_per_stage"] == [36, 18, 9, 4, 2][: len(layers) + 1]
    assert any(f"using the default layers {layers}" in r.getMessage() for r in caplog.records)


@pytest.mark.compat  # which modules transformers quantises is its internals
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_language_model_answers_close_to_full_precision(tiny_deep_dir, bench, tmp_path, bits):
    import bitsandbytes as bnb

    from llava.eval.inference import prompt_batch
    from llava.model.builder import load_pretrained_model

    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    _, full, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    tokenizer, quantised, _, _ = load_pretrained_model(tiny_deep_dir, device="cpu", **{f"load_{bits}bit": True})
    layer = quantised.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, kind) and isinstance(layer.mlp.down_proj, kind)
    assert not isinstance(quantised.lm_head, kind)
    assert not any(isinstance(m, kind) for m in quantised.model.mm_projector.modules())
    assert not any(isinstance(m, kind) for m in quantised.get_vision_tower().modules())

    questions = model_vqa_loader.load_questions(type("A", (), {"question_file": f"{bench}/pope/llava_pope_test.jsonl"}))
    ids, mask, pixels = prompt_batch(questions[:4], tokenizer, processor, full.config, f"{bench}/pope/val2014",
                                     "vicuna_v1")
    with torch.no_grad():
        reference = full(input_ids=ids, attention_mask=mask, images=pixels).logits[:, -1]
        logits = quantised(input_ids=ids, attention_mask=mask, images=pixels).logits[:, -1]
    # A random tiny model's next-token logits are nearly flat, so nf4 flips some argmaxes; what
    # holds is the logits' direction (another random model of this shape scores about 0).
    cosine = torch.nn.functional.cosine_similarity(logits.float(), reference, dim=-1)
    assert cosine.min() > (0.98 if bits == 8 else 0.85), cosine
    assert (logits.float() - reference).std() < 0.5 * reference.std()
    # ... and from the command line, recorded in the settings
    out = model_vqa_loader.main(_args(tiny_deep_dir, _questions(bench, tmp_path)[1], f"{bench}/pope/val2014",
                                      tmp_path / "a.jsonl", f"--load-{bits}bit"))
    assert len(read_jsonl(out)) == 4
    assert json.loads(open(out + ".settings.json").read())["quantization"] == f"{bits}bit"


def test_prune_method_flag_reaches_the_model_and_the_settings(tiny_deep_dir, bench, tmp_path):
    _, qfile = _questions(bench, tmp_path)
    out = model_vqa_loader.main(_args(tiny_deep_dir, qfile, f"{bench}/pope/val2014", tmp_path / "a.jsonl",
                                      "--prune-method", "fastv", "--vision-token-budget", "12"))
    pruning = json.loads(open(out + ".settings.json").read())["pruning"]
    assert pruning["method"] == "fastv" and pruning["prune_layers"] == [2]
    assert abs(pruning["average_vision_tokens"] - 12) <= 1 and len(read_jsonl(out)) == 4
