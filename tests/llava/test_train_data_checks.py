"""Training data checked in one pass before training: images that do not decode, and samples that
``--model_max_length`` would cut badly once each ``<image>`` has become the tower's features."""

import json
import os
import shutil

import pytest

from llava.cli import InputError
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.builder import load_tokenizer
from llava.tools.make_tiny_dataset import make_tiny_dataset
from llava.train.data import DataError, LengthCheck, check_records, encode_conversation, image_problem
from llava.train.train import run_training

IMAGE_TOKENS = 36  # the tiny tower: 6 x 6 patches


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_data")
    make_tiny_dataset(str(folder), samples=36, seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(tiny_deep_dir):
    return load_tokenizer(tiny_deep_dir)


@pytest.fixture()
def data_copy(tmp_path, tiny_data):
    folder = tmp_path / "data"
    shutil.copytree(tiny_data, folder)
    return folder


def _train(tmp_path, model_dir, data_dir, *extra, steps="1"):
    argv = [
        "--model_name_or_path", model_dir, "--data_path", os.path.join(data_dir, "data.json"),
        "--image_folder", str(data_dir), "--output_dir", str(tmp_path / "out"), "--max_steps", steps,
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--lora_r", "4", "--lora_alpha", "8",
        "--prune_layers", "1,3", "--vision_token_budget", "12", "--use_cpu", "True", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1", *extra,
    ]
    return run_training(argv)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_png_is_reported_by_sample_before_training_or_dropped(tmp_path, tiny_deep_dir, data_copy, caplog):
    _truncate(data_copy / "images" / "0001.png")  # sample 'shape-1'
    with pytest.raises(DataError, match=r"sample 'shape-1' \(#1\): image cannot be decoded: .*0001.png .*"
                                        r"--skip_bad_samples True"):
        _train(tmp_path, tiny_deep_dir, data_copy)
    assert not (tmp_path / "out" / "adsc_training.json").exists()
    result = _train(tmp_path, tiny_deep_dir, data_copy, "--skip_bad_samples", "True")
    assert result.dataset.skipped == ["sample 'shape-1' (#1)"] and len(result.dataset) == 35
    assert "shape-1" not in {r["id"] for r in result.dataset.records}
    assert "dropped 1 of 36 samples, e.g. sample 'shape-1' (#1): image cannot be decoded" in caplog.text


def test_image_check_catches_broken_files_but_passes_good_ones(tmp_path, random_images):
    random_images[0].save(tmp_path / "good.jpg")
    (tmp_path / "trailing.jpg").write_bytes((tmp_path / "good.jpg").read_bytes() + b"\0" * 2000)
    random_images[0].save(tmp_path / "good.png")
    for name in ("good.jpg", "good.png"):
        shutil.copy(tmp_path / name, tmp_path / f"cut-{name}")
        _truncate(tmp_path / f"cut-{name}")
    (tmp_path / "text.png").write_text("not an image")
    assert image_problem(str(tmp_path / "good.jpg")) is None
    assert image_problem(str(tmp_path / "good.png")) is None
    assert image_problem(str(tmp_path / "trailing.jpg")) is None  # bytes after the end marker still decode
    for name in ("cut-good.jpg", "cut-good.png", "text.png"):
        assert image_problem(str(tmp_path / name)).startswith("image cannot be decoded"), name
    assert image_problem(str(tmp_path / "none.png")).startswith("image file not found")


def _spliced(tokenizer, record):
    """First target position and image position after splicing, counted here independently."""
    sample = encode_conversation(record, tokenizer, "v1")
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    marker = ids.index(IMAGE_TOKEN_INDEX)
    first_target = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return first_target + IMAGE_TOKENS - 1, marker, len(ids) + IMAGE_TOKENS - 1


def _long_question_data(folder, tokenizer):
    records = json.loads((folder / "data.json").read_text())
    long = {"id": "long-36", "image": records[0]["image"], "conversations": [
        {"from": "human", "value": "<image>\n" + "Describe the image in detail please. " * 8},
        {"from": "gpt", "value": "A red circle."}]}
    records.append(long)
    (folder / "data.json").write_text(json.dumps(records))
    reply_at, _, _ = _spliced(tokenizer, long)
    longest_other = max(_spliced(tokenizer, r)[2] if "image" in r else
                        len(encode_conversation(r, tokenizer, "v1").input_ids) for r in records[:-1])
    assert longest_other < reply_at - 5  # a limit exists that cuts only the long sample's reply
    return reply_at - 2


def test_a_reply_cut_off_by_the_image_features_is_reported_by_sample_or_dropped(
        tmp_path, tiny_deep_dir, data_copy, tokenizer, caplog):
    limit = _long_question_data(data_copy, tokenizer)
    with pytest.raises(DataError, match=rf"sample 'long-36' \(#36\): .* --model_max_length {limit} cuts off "
                                        r"every reply"):
        _train(tmp_path, tiny_deep_dir, data_copy, "--model_max_length", str(limit))
    result = _train(tmp_path, tiny_deep_dir, data_copy, "--model_max_length", str(limit), "--skip_bad_samples", "True")
    assert result.dataset.skipped == ["sample 'long-36' (#36)"] and len(result.dataset) == 36
    assert "dropped 1 of 37 samples" in caplog.text


def test_an_image_cut_in_two_by_truncation_is_reported_by_sample_before_training(
        tmp_path, tiny_deep_dir, tiny_data, tokenizer):
    records = json.load(open(os.path.join(tiny_data, "data.json")))
    _, marker, _ = _spliced(tokenizer, records[0])
    limit = marker + IMAGE_TOKENS // 2  # inside every image's features (the image opens the first turn)
    with pytest.raises(DataError, match=rf"at least 10 bad samples .*sample 'shape-0' \(#0\): .* --model_max_length "
                                        rf"{limit} would cut an image in two \(its features are tokens {marker}-"):
        _train(tmp_path, tiny_deep_dir, tiny_data, "--model_max_length", str(limit))


def test_the_check_tokenises_each_sample_once_and_keeps_the_spliced_lengths(tiny_data, tokenizer, monkeypatch):
    import llava.train.data as data

    records = json.load(open(os.path.join(tiny_data, "data.json")))
    calls = []
    encode = data._encode
    monkeypatch.setattr(data, "_encode", lambda *a, **k: calls.append(a[0]["id"]) or encode(*a, **k))
    check = check_records(records, tiny_data, lengths=LengthCheck(tokenizer, "v1", 2048, IMAGE_TOKENS))
    assert calls == [r["id"] for r in records]
    for record, length in zip(records, check.lengths):
        ids = encode_conversation(record, tokenizer, "v1").input_ids
        assert length == len(ids) + (IMAGE_TOKENS - 1) * ("image" in record)


def test_data_errors_are_input_errors():
    assert issubclass(DataError, InputError) and issubclass(DataError, ValueError)
