"""Packaging for ``llava`` (LLaVA-1.5 on transformers 5) and ``adsc_patch`` (the ADSC method)."""

from setuptools import find_packages, setup

# The ranges we test. transformers: both ends are tested on every submission (the lowest
# release in a second environment; adsc_patch.compat reads its internals at import and says
# the same range). torch has no upper cap: a GPU machine keeps the CUDA build it has. The
# exact tested CPU environment is requirements/lock-cpu.txt, which scripts/quickstart.sh and
# scripts/test.sh install by default (docs/compatibility.md).
CORE = [
    "torch>=2.6",
    "transformers>=5.23,<5.26",
    "peft>=0.17",
    "accelerate>=1.10",
    "safetensors>=0.5",
    "sentencepiece>=0.2",
    "protobuf>=4",  # reading sentencepiece tokenizer.model files into transformers
    "tokenizers>=0.22",
    "pillow>=10",
    "numpy>=1.26",
    "tqdm>=4.66",
]

PLAYGROUND = ["scikit-learn>=1.4", "matplotlib>=3.8"]
DEMO = ["gradio>=5", "pillow<13"]
# What lmms-eval (0.7.x) needs to run our model on its tasks. lmms-eval itself is installed
# without its declared dependencies (pip install --no-deps "lmms_eval==0.7.3"): it declares
# torchvision, opencv, wandb==0.25 and ~40 more for its own built-in models, which this stack
# neither needs nor can install beside torch's CPU wheel (docs/evaluation.md). filelock 4.3
# dropped the private module lmms-eval's evaluator imports.
LMMS = ["loguru>=0.7", "sacrebleu>=2", "evaluate>=0.4", "datasets>=2.19", "tenacity>=8.3", "pytablewriter>=1",
        "filelock<4.3"]

EXTRAS = {
    "train": ["deepspeed>=0.16", "bitsandbytes>=0.45"],
    "demo": DEMO,
    "flash": ["flash-attn>=2.6"],
    "playground": PLAYGROUND,
    "lmms": LMMS,
    # deepspeed: the tests run the ZeRO-3 recipe in one CPU process; bitsandbytes: 4/8-bit
    # loading and a QLoRA step are tested on the CPU; gradio and playwright (driving the
    # system's Chromium, no browser download): the demo's API and browser tests
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "deepspeed>=0.16", "bitsandbytes>=0.45", *PLAYGROUND, *DEMO,
            "playwright>=1.50", *LMMS],
}

setup(
    name="llava-adsc",
    version="0.1.0",
    description="LLaVA-1.5 on current transformers with ADSC vision-token pruning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llava", "llava.*", "adsc_patch", "adsc_patch.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    # lmms-eval finds our model by this entry point: python -m lmms_eval --model adsc ...
    entry_points={"lmms_eval.models": ["adsc = llava.eval.lmms_adsc:MANIFEST"]},
    license="Apache-2.0",
)
