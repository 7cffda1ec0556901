import json
import os

import pytest

from llava.tools import make_tiny_checkpoint as tool


def test_cli_writes_a_loadable_llava_folder(tmp_path):
    out = tmp_path / "tiny"
    tool.main(["--out", str(out), "--layers", "3", "--seed", "5"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["mm_vision_tower"] == "vision_tower"
    assert {"tokenizer.model", "tokenizer_config.json", "model.safetensors"} <= set(os.listdir(out))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(out / "vision_tower"))
    from llava.model.builder import load_pretrained_model

    _, model, _, _ = load_pretrained_model(str(out), device="cpu")
    assert len(model.model.layers) == 3


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = tool.make_tiny_checkpoint(str(tmp_path / "a"), seed=7)
    b = tool.make_tiny_checkpoint(str(tmp_path / "b"), seed=7)
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert open(os.path.join(a, "tokenizer.model"), "rb").read() == open(os.path.join(b, "tokenizer.model"), "rb").read()


def test_cli_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path / "x")])


def test_make_tiny_benchmarks_says_what_it_wrote_and_how_to_use_it(tmp_path, capsys):
    from llava.tools import make_tiny_benchmarks

    make_tiny_benchmarks.main(["--out", str(tmp_path), "--per-benchmark", "2"])
    said = capsys.readouterr().out.strip()
    assert said == (f"wrote 2 questions each of gqa, mme, pope, scienceqa, textvqa, vqav2 (upstream's layout) under "
                    f"{tmp_path}; point the eval scripts at it with EVAL_DIR={tmp_path}")
    assert sorted(os.listdir(tmp_path)) == ["MME", "gqa", "pope", "scienceqa", "textvqa", "vqav2"]
