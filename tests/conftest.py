"""Shared fixtures: tiny random checkpoints and models, built offline once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> str:
    """A tiny checkpoint in upstream LLaVA-1.5 layout (4 layers, 36 vision tokens)."""
    from llava.tools.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_llava")), format="llava", seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> str:
    """The same weights in transformers' llava-hf layout."""
    from llava.tools.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_hf")), format="hf", seed=0)


@pytest.fixture(scope="session")
def tiny_deep_dir(tmp_path_factory) -> str:
    """A deeper tiny checkpoint (8 layers) so schedules have several stages."""
    from llava.tools.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_deep")), format="llava", seed=1, layers=8)


@pytest.fixture(scope="session")
def tiny_finetuned_dir(tiny_deep_dir, tmp_path_factory) -> str:
    """``tiny_deep_dir`` whose config.json records what training writes after fine-tuning with
    ADSC at layers [1, 4], budget 12 (``LlavaLlamaForCausalLM.recorded_pruning``)."""
    import json
    import shutil

    path = str(tmp_path_factory.mktemp("recorded") / "adsc-finetuned")
    shutil.copytree(tiny_deep_dir, path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(prune_method="adsc", prune_layers=[1, 4], vision_token_budget=12, drop_ratio=0.0)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    """A tiny transformers Qwen2.5-VL checkpoint (4 layers; processor, tokenizer, chat template)."""
    from llava.tools.make_tiny_vlm import make_tiny_vlm

    return make_tiny_vlm(str(tmp_path_factory.mktemp("tiny_qwen")), seed=0)


@pytest.fixture(scope="session")
def loaded_tiny(tiny_llava_dir):
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(tiny_llava_dir, device="cpu")


@pytest.fixture()
def random_images():
    """Three RGB images of different aspect ratios."""
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for h, w in ((40, 50), (64, 30), (48, 48))]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A tiny LLaVA training set (24 samples, ``data.json`` + images); modules may override it."""
    from llava.tools.make_tiny_dataset import make_tiny_dataset

    folder = tmp_path_factory.mktemp("tiny_data")
    make_tiny_dataset(str(folder), samples=24, seed=0)
    return str(folder)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def oracles_dir(tmp_path_factory) -> str:
    """The scorer oracles (tests/data/oracles.tar.gz), extracted: ``<dir>/mme``, ``<dir>/pope``."""
    import tarfile

    target = tmp_path_factory.mktemp("oracles")
    archive = os.path.join(os.path.dirname(__file__), "data", "oracles.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return str(target / "oracles")
