"""The README's Python examples run as written, in order, on a tiny checkpoint of LLaVA-1.5-7B's
shape where it matters (32 decoder layers, 576 vision tokens); only the hub id and the image
file are substituted, and the schedule the first example prints is the one its comment shows."""

import os
import re

import pytest

from adsc_patch.methods import unregister_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def _python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_readme_examples_run_as_written(tmp_path, random_images, capsys):
    from llava.tools.make_tiny_checkpoint import make_tiny_checkpoint

    blocks = _python_blocks()
    assert len(blocks) >= 3 and 'load_pretrained_model("liuhaotian/llava-v1.5-7b")' in blocks[0]
    checkpoint = make_tiny_checkpoint(str(tmp_path / "llava-v1.5-7b-shaped"), layers=32, image_size=336,
                                      patch_size=14)
    image = tmp_path / "cat.jpg"
    random_images[0].save(image)
    namespace: dict = {}
    try:
        for block in blocks:
            code = block.replace('"liuhaotian/llava-v1.5-7b"', repr(checkpoint)).replace('"cat.jpg"', repr(str(image)))
            exec(compile(code, "README.md", "exec"), namespace)
    finally:
        unregister_method("keep_first")
    printed = capsys.readouterr().out.splitlines()
    comment = re.search(r"print\(schedule\.describe\(\)\)\s+# (.*)", blocks[0]).group(1)
    described = [line for line in printed if "vision tokens, average" in line]
    assert described and comment.strip() in described[0], (comment, described)
    assert namespace["model"].config.prune_method == "keep_first"
    assert namespace["session"].trace is not None
