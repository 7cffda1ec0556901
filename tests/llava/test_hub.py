"""Hub ids resolve from the local Hugging Face cache offline (checkpoint, tower, tokenizer, LoRA
base) as transformers resolves them; a LoRA loaded on another base than it records is named."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from llava.model.builder import CheckpointError, load_pretrained_model
from llava.model.hub import ResolutionError, resolve_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: str, repo_id: str, source: str) -> str:
    """Lay ``source`` out in ``cache`` as huggingface_hub stores a downloaded snapshot."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    shutil.copytree(source, snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    return snapshot


@pytest.fixture()
def hub_cache(tiny_llava_dir, tmp_path, monkeypatch):
    """``fakeorg/tiny-llava`` whose config names the tower ``fakeorg/tiny-clip``, both cached only."""
    from huggingface_hub import constants

    cache = str(tmp_path / "hub")
    model = cache_repo(cache, "fakeorg/tiny-llava", tiny_llava_dir)
    shutil.rmtree(os.path.join(model, "vision_tower"))
    config = json.loads(open(os.path.join(model, "config.json")).read())
    config["mm_vision_tower"] = "fakeorg/tiny-clip"
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(config, f)
    cache_repo(cache, "fakeorg/tiny-clip", os.path.join(tiny_llava_dir, "vision_tower"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_cached_hub_ids_load_offline_from_the_command_line(hub_cache, tiny_llava_dir, tmp_path, random_images):
    image = str(tmp_path / "image.png")
    random_images[0].save(image)
    flags = ["--image-file", image, "--query", "What is this?", "--temperature", "0", "--max_new_tokens", "5",
             "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "llava.eval.run_llava", "--model-path", "fakeorg/tiny-llava", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=hub_cache))
    assert done.returncode == 0, done.stderr[-2000:]
    # the reference: the same weights from their local folder
    from llava.eval.run_llava import main

    assert done.stdout.strip().splitlines()[-1] == main(["--model-path", tiny_llava_dir, *flags])


def test_tokenizer_tower_and_lora_base_come_from_the_cache(hub_cache, tiny_llava_dir, loaded_tiny, tmp_path):
    from tests.llava.test_builder import _make_lora_output

    tokenizer, model, processor, _ = load_pretrained_model("fakeorg/tiny-llava", device="cpu")
    tower = model.get_vision_tower()
    assert tower.vision_tower_name.startswith(os.path.join(hub_cache, "models--fakeorg--tiny-clip"))
    assert len(tokenizer) == len(loaded_tiny[0])
    merged = _make_lora_output(loaded_tiny[1], str(tmp_path / "lora"))
    _, on_cached_base, _, _ = load_pretrained_model(str(tmp_path / "lora"), model_base="fakeorg/tiny-llava",
                                                    device="cpu")
    for name, value in merged.state_dict().items():
        if "vision_tower" not in name:
            assert (on_cached_base.state_dict()[name] == value).all(), name


def test_unresolvable_names_say_where_they_were_looked_for(hub_cache, tmp_path):
    with pytest.raises(CheckpointError, match="'fakeorg/absent' is neither a local folder nor in the Hugging Face "
                                              "cache .*hub.* and the hub is offline"):
        load_pretrained_model("fakeorg/absent", device="cpu")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ResolutionError, match="is a file, not a model folder"):
        resolve_pretrained(str(tmp_path / "file"), "model path")
    with pytest.raises(ResolutionError, match="'./missing/folder/x' does not exist"):
        resolve_pretrained("./missing/folder/x", "model path")


def test_vision_tower_override_on_the_eval_command_line(tiny_llava_dir, tmp_path, random_images):
    """A checkpoint naming a tower that is not here runs with ``--vision-tower`` pointing at a copy."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, folder, ignore=shutil.ignore_patterns("vision_tower"))
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (folder / "config.json").write_text(json.dumps(config))
    image = str(tmp_path / "image.png")
    random_images[0].save(image)
    from llava.eval.run_llava import main

    flags = ["--image-file", image, "--query", "What?", "--temperature", "0", "--max_new_tokens", "4", "--device", "cpu"]
    with pytest.raises(ResolutionError, match="clip-vit-large-patch14-336.*--vision-tower"):
        main(["--model-path", str(folder), *flags])
    answer = main(["--model-path", str(folder), "--vision-tower", os.path.join(tiny_llava_dir, "vision_tower"), *flags])
    assert answer == main(["--model-path", tiny_llava_dir, *flags])


def _adapter_base(lora_dir, base):
    path = os.path.join(lora_dir, "adapter_config.json")
    config = json.loads(open(path).read())
    config["base_model_name_or_path"] = base
    with open(path, "w") as f:
        json.dump(config, f)


def _base_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "was trained on base" in r.getMessage()]


def test_lora_on_another_base_than_it_records_is_named(hub_cache, tiny_llava_dir, loaded_tiny, tmp_path, caplog):
    from tests.llava.test_builder import _make_lora_output

    lora = str(tmp_path / "lora")
    _make_lora_output(loaded_tiny[1], lora)
    from llava.tools.make_tiny_checkpoint import make_tiny_checkpoint

    same_shape = make_tiny_checkpoint(str(tmp_path / "vicuna-like"), seed=7)  # another model of the same shape
    copy = str(tmp_path / "copy-of-the-base")  # the recorded base's weights under another name
    shutil.copytree(tiny_llava_dir, copy)
    _adapter_base(lora, tiny_llava_dir)
    with caplog.at_level(logging.WARNING):
        load_pretrained_model(lora, model_base=tiny_llava_dir, device="cpu")
        load_pretrained_model(lora, model_base=copy, device="cpu")
        assert _base_warnings(caplog) == []
        load_pretrained_model(lora, model_base=same_shape, device="cpu")
    [warning] = _base_warnings(caplog)
    assert repr(tiny_llava_dir) in warning and repr(same_shape) in warning

    caplog.clear()
    _adapter_base(lora, "fakeorg/tiny-llava")  # recorded as a hub id, in the cache
    snapshot = resolve_pretrained("fakeorg/tiny-llava", "x")
    with caplog.at_level(logging.WARNING):
        load_pretrained_model(lora, model_base="fakeorg/tiny-llava", device="cpu")
        load_pretrained_model(lora, model_base=snapshot, device="cpu")
        assert _base_warnings(caplog) == []
        load_pretrained_model(lora, model_base=same_shape, device="cpu")
    assert len(_base_warnings(caplog)) == 1 and "'fakeorg/tiny-llava'" in _base_warnings(caplog)[0]

    caplog.clear()
    _adapter_base(lora, "/home/someone/checkpoints/llava-v1.5-7b")  # a folder of another machine
    with caplog.at_level(logging.WARNING):
        load_pretrained_model(lora, model_base=same_shape, device="cpu")
    assert _base_warnings(caplog) == []
