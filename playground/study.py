"""The ADSC study in miniature on DigitGrid: ``python -m playground.study [--smoke] [--ablations]``.

Stages (each is skipped when its output exists, so an interrupted study resumes):

0. data: training JSON (LLaVA format) and the evaluation question / ground-truth files;
1. tower: pre-train the tiny CLIP tower (``playground.tower``);
2. full: a 16-layer, 96-wide LLaVA trained on all vision tokens (``llava.train.train``,
   ``--finetune_mode full --curriculum none``): the Table I upper bound;
3. ADSC: ``scripts/v1_5/finetune_adsc_lora.sh`` (the script users run: LoRA on the
   language model + trainable projector, reverse curriculum) at budgets of 1/3, 2/9 and 1/9
   of the vision tokens (the analogs of 192, 128, 64 of 576), merged into complete
   checkpoints ``checkpoints/adsc-1of3`` ...;
4. evaluation with ``llava.eval.model_vqa_loader``: the full model, each ADSC model, and
   the ADSC schedule applied to the full model without fine-tuning (training-free);
5. efficiency: analytic FLOPs and KV cache per setting (``adsc_patch.profile``) and the
   measured prefill time of one batch, all in one run;
6. ``results.json``, ``results.md`` (Tables I and IV analogs, and II/III with
   ``--ablations``) and ``accuracy_vs_tokens.png`` (Figure 2 analog).

Everything lands in ``playground/runs/<name>/``; data in ``playground/data/``.

``--arch qwen2_5_vl`` runs the same stages on a tiny Qwen2.5-VL of transformers' own classes
(``playground.qwen``) with DigitGrid images of varying size, so every image has its own
number of vision tokens and its own schedule: budgets are fractions of each image's tokens,
fine-tunes run ``scripts/qwen2_5_vl/finetune_adsc_lora.sh``, and the baselines are the
in-decoder ones (the pre-LLM methods are LLaVA-1.5's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from adsc_patch.methods import get_method
from llava.eval.io import write_json_atomic

logger = logging.getLogger("playground")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGETS = (("1of3", 1 / 3), ("2of9", 2 / 9), ("1of9", 1 / 9))
# The baselines of docs/methods.md: name -> (label, prune method, selection). ``random`` is
# ADSC's loop with a seeded random subset: the floor every selection rule must beat.
BASELINES = {
    "random": ("random subset", "adsc", "random"),
    "fastv": ("FastV", "fastv", None),
    "pdrop": ("PyramidDrop", "pdrop", None),
    "tome": ("ToMe", "tome", None),
    "visionzip": ("VisionZip", "visionzip", None),
    "pool": ("2-D pooling", "pool", None),
    # the documented variants (docs/methods.md), not in the default run: --config '{"baselines": [...]}'
    "pdrop_original_ids": ("PyramidDrop, original position ids", "pdrop_original_ids", None),
    "visionzip_spread": ("VisionZip, spread variant", "visionzip_spread", None),
}
DEFAULT_BASELINES = ("random", "fastv", "pdrop", "tome", "visionzip", "pool")
ARCHITECTURES = ("llava", "qwen2_5_vl")
# Per architecture: what differs from the LLaVA-1.5 study's defaults (``StudyConfig.for_arch``).
ARCH_DEFAULTS = {
    "llava": {},
    "qwen2_5_vl": dict(arch="qwen2_5_vl", image_sizes=(120, 144, 168), tower_hidden_size=128, tower_layers=4,
                       tower_steps=900, tower_lr=4e-3, full_steps=600, baselines=("random", "fastv", "pdrop")),
}


@dataclass
class StudyConfig:
    """Every knob of the study; presets below. Steps are optimizer steps."""

    name: str = "default"
    arch: str = "llava"  # llava (LLaVA-1.5) | qwen2_5_vl (transformers' Qwen2.5-VL, images of varying size)
    device: str = "cpu"
    seed: int = 0
    train_images: int = 6000
    eval_images: int = 200
    secondary_eval_images: int = 50
    secondary_share: float = 0.0  # share of training images that also get a secondary question
    tower_steps: int = 800
    tower_batch: int = 32
    tower_lr: float = 2e-3
    tower_jitter: int = 2  # px each glyph moves inside its cell during tower pre-training
    tower_rotate: float = 0.0  # degrees; off by default (5 layers reached 98.4% on a probe without it)
    tower_scale: float = 0.0
    tower_layers: int = 5
    tower_hidden_size: int = 128
    image_size: int = 88  # 11 x 11 patches of 8 px: 2.75 per digit cell, so patches and cells do not line up
    image_sizes: tuple = ()  # DigitGrid sizes of varying-size images (empty: every image 96 x 96)
    layers: int = 16
    hidden_size: int = 96
    intermediate_size: int = 192
    full_steps: int = 480
    full_batch: int = 16
    full_lr: float = 1e-3
    prune_layers: tuple = (1, 4)
    adsc_steps: int = 600  # 400 left 1/9 at the mercy of the seed (docs/playground.md)
    adsc_batch: int = 16
    adsc_lr: float = 1e-3
    adsc_projector_lr: float = 1e-3
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    curriculum: str = "reverse"
    curriculum_phase_fractions: tuple = ()  # share of the ADSC steps per curriculum phase (empty: equal thirds)
    finetune_seeds: tuple = ()  # seeds of the ADSC fine-tunes (empty: `seed` only); more seeds add rows
    eval_batch: int = 32
    ablations: bool = False
    ablation_budget: str = "1of9"  # Tables II/III analogs at this budget (the paper's are at 192 of 576)
    baselines: tuple = DEFAULT_BASELINES  # training-free rows of every one at every budget (default run)
    baselines_finetuned: bool = False  # also fine-tune each baseline with ADSC's recipe at ablation_budget
    full_ft_lr: float = 3e-4
    budgets: tuple = field(default_factory=lambda: tuple(name for name, _ in BUDGETS))

    @classmethod
    def for_arch(cls, arch: str, preset: str = "default", **overrides) -> "StudyConfig":
        """The study on ``arch`` (``ARCHITECTURES``) under ``preset`` (default, smoke or cuda):
        the architecture's defaults, then the preset's, then ``overrides``. Run folders of
        other architectures than LLaVA-1.5 are named after them."""
        if arch not in ARCH_DEFAULTS:
            raise ValueError(f"architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
        values = {**ARCH_DEFAULTS[arch], **PRESETS[preset]}
        if arch != "llava":
            values["name"] = arch if preset != "smoke" else f"{arch}-smoke"
        return cls(**{**values, **overrides})

    @classmethod
    def smoke(cls, **overrides) -> "StudyConfig":
        """A few minutes on a CPU, for CI: every stage runs, nothing is expected to learn."""
        return cls(**{**PRESETS["smoke"], **overrides})

    @classmethod
    def cuda(cls, **overrides) -> "StudyConfig":
        """The same study scaled up for a GPU: more data, steps and evaluation images."""
        return cls(**{**PRESETS["cuda"], **overrides})


PRESETS = {
    "default": {},
    "smoke": dict(name="smoke", train_images=96, eval_images=8, secondary_eval_images=2, tower_steps=4,
                  full_steps=4, adsc_steps=3, full_batch=8, adsc_batch=8, eval_batch=8),
    "cuda": dict(device="cuda", train_images=20000, eval_images=1000, secondary_eval_images=200,
                 tower_steps=2000, full_steps=2000, adsc_steps=600),
}

# May differ between runs in one folder: they change what is added or how fast, not what is there.
FIELDS_FREE_ON_RESUME = ("name", "device", "ablations", "eval_batch", "finetune_seeds", "baselines",
                         "baselines_finetuned")


class Study:
    """The stages of one study; ``workdir`` holds ``runs/<name>/`` and ``data/``.

    A run folder belongs to one configuration (``study_config.json``): finished stages are
    skipped on the next run, so a changed setting must go to a new ``--name``.
    """

    def __init__(self, config: StudyConfig, workdir: str = os.path.join(ROOT, "playground")):
        self.config = config
        self.run_dir = os.path.join(workdir, "runs", config.name)
        self.ckpt = os.path.join(self.run_dir, "checkpoints")
        train_set = f"train-{config.train_images}-{config.seed}"
        if config.secondary_share:
            train_set += f"-secondary{config.secondary_share:g}"
        sizes = "-sizes" + "-".join(map(str, config.image_sizes)) if config.image_sizes else ""
        self.data_dir = os.path.join(workdir, "data", "digitgrid", train_set + sizes)
        self.eval_dir = os.path.join(workdir, "data", "eval", "digitgrid" + sizes)
        if config.arch not in ARCH_DEFAULTS:
            raise ValueError(f"architecture {config.arch!r}: expected one of {', '.join(ARCHITECTURES)}")
        if config.arch != "llava":
            before_decoder = [b for b in config.baselines if not get_method(BASELINES[b][1]).in_decoder]
            if before_decoder:
                raise ValueError(f"baselines {', '.join(before_decoder)} prune before the decoder, which only "
                                 f"LLaVA-1.5 supports; on {config.arch} the baselines are the in-decoder ones")
        os.makedirs(self.ckpt, exist_ok=True)
        self._claim_run_dir()
        self.timings: dict[str, float] = {}

    def _claim_run_dir(self) -> None:
        """Record this configuration in the run folder, or refuse one made with another."""
        path = os.path.join(self.run_dir, "study_config.json")
        mine = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self.config).items()
                                      if k not in FIELDS_FREE_ON_RESUME}))
        if not os.path.exists(path):
            write_json_atomic(path, mine)
            return
        with open(path) as f:
            saved = json.load(f)
        changed = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in mine.items() if saved.get(k) != v]
        if changed:
            raise ValueError(f"{self.run_dir} holds a study with other settings ({'; '.join(changed)}); "
                             "its finished stages would be reused, so give this study another --name "
                             "or delete that folder")

    @property
    def qwen(self) -> bool:
        """Whether this is the study on transformers' Qwen2.5-VL (``playground.qwen``)."""
        return self.config.arch == "qwen2_5_vl"

    # ----------------------------------------------------------------------- stages
    def _stage(self, name: str, done: bool, run) -> None:
        if done:
            logger.info("stage %s: already done, skipping", name)
            return
        start = time.time()
        logger.info("stage %s ...", name)
        run()
        self.timings[name] = time.time() - start
        logger.info("stage %s: %.1f min", name, self.timings[name] / 60)

    def data(self) -> None:
        from .digitgrid import write_eval_data, write_training_data

        c = self.config
        train_json = os.path.join(self.data_dir, "train.json")
        self._stage("data/train", os.path.exists(train_json),
                    lambda: write_training_data(self.data_dir, c.train_images, c.seed, c.secondary_share,
                                                c.image_sizes or None))
        eval_marker = os.path.join(self.eval_dir, f"{c.eval_images}-{c.secondary_eval_images}-{c.seed}.done")

        def make_eval():
            if os.path.isdir(self.eval_dir):
                shutil.rmtree(self.eval_dir)
            write_eval_data(self.eval_dir, c.eval_images, c.seed + 1000, secondary_images=c.secondary_eval_images,
                            sizes=c.image_sizes or None)
            open(eval_marker, "w").close()

        self._stage("data/eval", os.path.exists(eval_marker), make_eval)

    def tower(self) -> None:
        from .tower import pretrain_tower, tower_config

        out = os.path.join(self.ckpt, "tower")
        c = self.config

        def run():
            if self.qwen:
                from . import qwen

                accuracy = qwen.pretrain_tower(
                    out + ".tmp", qwen.vision_config(c.tower_hidden_size, c.tower_layers, c.hidden_size),
                    steps=c.tower_steps, batch_size=c.tower_batch, lr=c.tower_lr, seed=c.seed, device=c.device,
                    jitter=c.tower_jitter, sizes=c.image_sizes, log_every=max(1, c.tower_steps // 6))
            else:
                accuracy = pretrain_tower(out + ".tmp", steps=c.tower_steps, batch_size=c.tower_batch, lr=c.tower_lr,
                                          seed=c.seed, device=c.device,
                                          config=tower_config(c.image_size, hidden_size=c.tower_hidden_size, layers=c.tower_layers),
                                          jitter=c.tower_jitter, rotate=c.tower_rotate, scale=c.tower_scale,
                                          log_every=max(1, c.tower_steps // 6))
            with open(os.path.join(out + ".tmp", "pretrain_accuracy.json"), "w") as f:
                json.dump(accuracy, f)
            os.replace(out + ".tmp", out)

        self._stage("tower", os.path.exists(os.path.join(out, "config.json")), run)

    def init_model(self) -> None:
        out = os.path.join(self.ckpt, "init")
        c = self.config
        tower = os.path.join(self.ckpt, "tower")

        def run():
            if self.qwen:
                from .qwen import build_initial_checkpoint
            else:
                from .model import build_initial_checkpoint
            if os.path.exists(out + ".tmp"):
                shutil.rmtree(out + ".tmp")
            build_initial_checkpoint(out + ".tmp", tower, c.layers, c.hidden_size, c.intermediate_size, c.seed)
            os.replace(out + ".tmp", out)

        self._stage("init", os.path.exists(os.path.join(out, "config.json")), run)

    def train_full(self) -> None:
        from llava.train.train import run_training

        out = os.path.join(self.ckpt, "full")
        c = self.config

        def run():
            run_training(self._train_args(os.path.join(self.ckpt, "init"), out + ".tmp", c.full_steps, c.full_batch,
                                          c.full_lr, ["--finetune_mode", "full", "--curriculum", "none"]))
            os.replace(out + ".tmp", out)

        self._stage("full", os.path.exists(os.path.join(out, "model.safetensors")), run)

    def _train_args(self, model, out, steps, batch, lr, extra) -> list[str]:
        return [
            "--model_name_or_path", model, *([] if self.qwen else ["--version", "v1"]),
            "--data_path", os.path.join(self.data_dir, "train.json"), "--image_folder", self.data_dir,
            "--output_dir", out, "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
            "--learning_rate", str(lr), "--mm_projector_lr", str(lr), "--warmup_ratio", "0.05",
            "--lr_scheduler_type", "cosine", "--weight_decay", "0", "--logging_steps", "10",
            "--save_strategy", "no", "--report_to", "none", "--model_max_length", "512",
            "--dataloader_num_workers", "0", "--seed", str(self.config.seed),
            *(["--use_cpu", "True"] if self.config.device == "cpu" else ["--bf16", "True"]),
            *extra,
        ]

    def budget_tokens(self, fraction: float) -> float:
        from transformers import CLIPVisionConfig

        tower = CLIPVisionConfig.from_pretrained(os.path.join(self.ckpt, "tower"))
        return (tower.image_size // tower.patch_size) ** 2 * fraction

    def budget(self, fraction: float) -> dict:
        """The budget entry of a schedule: LLaVA-1.5's mean vision tokens per layer, or on a model
        whose images differ in size the fraction of each image's own tokens."""
        if self.qwen:
            return {"budget_fraction": fraction}
        return {"vision_token_budget": self.budget_tokens(fraction)}

    def method_schedule(self, baseline: str, fraction: float) -> dict:
        """``configure_pruning`` arguments of a baseline at ``fraction`` of the vision tokens.

        The in-decoder methods prune where ADSC does, as each takes a fine-tuned schedule
        (``PruneMethod.layers_on_recorded``: PyramidDrop at ADSC's layers, FastV at the first of
        them: layer 1 of 16 is FastV's K = 2 of 32), so they differ from ADSC only in how they
        pick; the pre-LLM methods take no layers."""
        _, method, selection = BASELINES[baseline]
        layers = list(get_method(method).layers_on_recorded(self.config.prune_layers, self.config.layers))
        schedule = {"prune_layers": layers, **self.budget(fraction), "method": method}
        if selection:
            schedule["selection"] = selection
        return schedule

    def adsc(self, label: str, fraction: float, tag: str = "", baseline: str | None = None, **overrides) -> str:
        """Fine-tune the full model with ADSC (or with ``baseline``'s selection in ADSC's exact
        recipe) at ``fraction`` of the vision tokens through the user-facing script, then merge
        the adapter into a complete checkpoint. ``overrides``: ``finetune_mode``,
        ``curriculum``, ``lr``, ``seed`` (default: the study's)."""
        c = self.config
        name = f"{baseline}-ft-{label}{tag}" if baseline else f"adsc-{label}{tag}"
        method = self.method_schedule(baseline, fraction) if baseline else {
            "prune_layers": list(c.prune_layers), "method": "adsc", "selection": "uniform_2d"}
        lora_out = os.path.join(self.ckpt, name + "-lora")
        merged = os.path.join(self.ckpt, name)
        mode = overrides.get("finetune_mode", "lora")

        def run():
            env = dict(
                os.environ,
                MODEL_PATH=os.path.join(self.ckpt, "full"), DATA_PATH=os.path.join(self.data_dir, "train.json"),
                IMAGE_FOLDER=self.data_dir, OUTPUT_DIR=lora_out,
                PRUNE_LAYERS=",".join(map(str, method["prune_layers"])), PRUNE_METHOD=method["method"],
                SELECTION=method.get("selection", "uniform_2d"), CURRICULUM=overrides.get("curriculum", c.curriculum),
                PHASE_FRACTIONS=",".join(f"{x:g}" for x in c.curriculum_phase_fractions),
                FINETUNE_MODE=mode, LORA_R=str(c.lora_r), LORA_ALPHA=str(c.lora_alpha), LORA_DROPOUT=str(c.lora_dropout),
                LR=str(overrides.get("lr", c.adsc_lr)), MM_PROJECTOR_LR=str(c.adsc_projector_lr),
                GLOBAL_BATCH=str(c.adsc_batch), PER_DEVICE_BATCH=str(c.adsc_batch), MAX_STEPS=str(c.adsc_steps),
                MAX_LENGTH="512", WARMUP_RATIO="0.05", LOGGING_STEPS="10", GRADIENT_CHECKPOINTING="False",
                SAVE_STEPS="100000", SEED=str(overrides.get("seed", c.seed)), NUM_WORKERS="0",
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
            )
            if self.qwen:
                env.update(BUDGET_FRACTION=f"{fraction:.6f}", SAVE_EVERY_MINUTES="0")
                script = os.path.join(ROOT, "scripts", "qwen2_5_vl", "finetune_adsc_lora.sh")
            else:
                env["BUDGET"] = f"{self.budget_tokens(fraction):.6f}"
                script = os.path.join(ROOT, "scripts", "v1_5", "finetune_adsc_lora.sh")
            if c.device == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
                env["NUM_GPUS"] = "0"
            log_path = os.path.join(self.run_dir, f"train-{name}.log")
            with open(log_path, "w") as log:
                done = subprocess.run(["bash", script], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"the fine-tune {name} failed (exit {done.returncode}); its log: {log_path}")
            if mode == "lora":
                _merge(lora_out, os.path.join(self.ckpt, "full"), merged)
            else:
                os.replace(lora_out, merged)

        self._stage(name, os.path.exists(os.path.join(merged, "config.json")), run)
        return merged

    # ----------------------------------------------------------------------- evaluation
    def evaluate(self, name: str, setting: "Setting") -> dict:
        """Answer the evaluation questions with ``model_vqa_loader`` and score them (cached)."""
        from llava.eval import model_vqa_loader
        from llava.eval.eval_digitgrid import score_digitgrid

        answers = os.path.join(self.run_dir, "answers", f"{name}.jsonl")
        scores_path = answers.replace(".jsonl", ".scores.json")
        if not os.path.exists(scores_path):
            model_vqa_loader.main([
                "--model-path", setting.path, "--question-file", os.path.join(self.eval_dir, "digitgrid_questions.jsonl"),
                "--image-folder", os.path.join(self.eval_dir, "images"), "--answers-file", answers,
                "--temperature", "0", "--max_new_tokens", "48", "--batch-size", str(self.config.eval_batch),
                "--device", self.config.device, "--num-workers", "0", *setting.flags(),
            ])
            scores = score_digitgrid(os.path.join(self.eval_dir, "digitgrid_answers.jsonl"), answers)
            if self.qwen:
                scores.update(self._vision_tokens_of_answers(answers))
            else:
                with open(answers + ".settings.json") as f:
                    pruning = json.load(f)["pruning"]
                scores["average_vision_tokens"] = pruning.get("average_vision_tokens")
                scores["vision_tokens_per_stage"] = pruning.get("vision_tokens_per_stage")
            write_json_atomic(scores_path, scores)
        with open(scores_path) as f:
            return json.load(f)

    def _vision_tokens_of_answers(self, answers: str) -> dict:
        """Over the transcriptions: the mean vision tokens per layer each answer's call ran
        (``metadata.mean_vision_tokens``), absolute and as a fraction of its image's own tokens."""
        from PIL import Image

        from llava.eval.io import read_jsonl

        from .qwen import image_tokens

        means, fractions = [], []
        questions = {q["question_id"]: q for q in read_jsonl(os.path.join(self.eval_dir, "digitgrid_questions.jsonl"))}
        for record in read_jsonl(answers):
            question = questions[record["question_id"]]
            if question["category"] != "transcribe":
                continue
            with Image.open(os.path.join(self.eval_dir, "images", question["image"])) as image:
                tokens = image_tokens(*image.size, self.config.image_sizes)
            means.append(record["metadata"]["mean_vision_tokens"])
            fractions.append(means[-1] / tokens)
        return {"average_vision_tokens": sum(means) / len(means),
                "average_vision_token_fraction": sum(fractions) / len(fractions)}

    def settings(self) -> dict[str, "Setting"]:
        """Everything the tables compare, training what is not trained yet."""
        c = self.config
        full = os.path.join(self.ckpt, "full")
        settings = {"full": Setting("full model (all tokens)", None, full)}
        for label, fraction in BUDGETS:
            if label not in c.budgets:
                continue
            schedule = {"prune_layers": list(c.prune_layers), **self.budget(fraction), "method": "adsc",
                        "selection": "uniform_2d"}
            settings[f"training-free-{label}"] = Setting("ADSC schedule, no fine-tuning", label, full, schedule)
            for seed in self.finetune_seeds():
                tag = "" if seed == c.seed else f"-seed{seed}"
                settings[f"adsc-{label}{tag}"] = Setting("ADSC (LoRA, reverse curriculum)", label,
                                                         self.adsc(label, fraction, tag, seed=seed), seed=seed)
            for baseline in c.baselines:
                settings[f"{baseline}-{label}"] = Setting(f"{BASELINES[baseline][0]}, no fine-tuning", label, full,
                                                          self.method_schedule(baseline, fraction))
        if c.baselines_finetuned or c.ablations:
            label = c.ablation_budget
            fraction = dict(BUDGETS)[label]
            for baseline in c.baselines:
                path = self.adsc(label, fraction, baseline=baseline)
                settings[f"{baseline}-ft-{label}"] = Setting(f"{BASELINES[baseline][0]} (LoRA, reverse curriculum)",
                                                             label, path, ablation="baselines")
        if c.ablations:
            label = c.ablation_budget
            fraction = dict(BUDGETS)[label]
            for tag, table, method, overrides in (
                ("full-ft", "regime", "ADSC, full fine-tuning", {"finetune_mode": "full", "lr": c.full_ft_lr}),
                ("standard", "curriculum", "ADSC, standard curriculum", {"curriculum": "standard"}),
                ("direct", "curriculum", "ADSC, direct (no curriculum)", {"curriculum": "direct"}),
            ):
                path = self.adsc(label, fraction, f"-{tag}", **overrides)
                settings[f"adsc-{label}-{tag}"] = Setting(method, label, path, ablation=table)
        return settings

    def finetune_seeds(self) -> tuple[int, ...]:
        """The seeds each ADSC fine-tune runs with; the study's own seed first (its rows keep
        the plain names ``adsc-1of3`` ...; other seeds add ``-seedN``)."""
        c = self.config
        return (c.seed, *[s for s in dict.fromkeys(c.finetune_seeds) if s != c.seed])

    def run(self) -> dict:
        self.data()
        self.tower()
        self.init_model()
        self.train_full()
        settings = self.settings()
        results = {}
        for name, setting in settings.items():
            start = time.time()
            results[name] = self.evaluate(name, setting)
            self.timings[f"eval/{name}"] = time.time() - start
        from .report import efficiency, vlm_efficiency, write_report

        measure = vlm_efficiency if self.qwen else efficiency
        cost = measure(settings, self.eval_dir, self.config.eval_batch, self.config.device)
        return write_report(self.run_dir, settings, results, cost, dataclasses.asdict(self.config), self.timings)


@dataclass(frozen=True)
class Setting:
    """One row of the tables: a checkpoint and the pruning it is evaluated with.

    ``schedule`` (``configure_pruning`` arguments: ``prune_layers``, ``vision_token_budget``,
    ``method``, ``selection``) is applied at evaluation; ``None`` means the checkpoint's own
    saved schedule (none for the full model). ``ablation``: ``None`` for Table I rows,
    ``"regime"`` (Table II), ``"curriculum"`` (III) or ``"baselines"`` (the fine-tuned baselines).
    ``seed``: the fine-tune's seed (``None``: not fine-tuned here); rows that differ only in
    it are reported as a mean with its spread.
    """

    method: str
    budget: str | None
    path: str
    schedule: dict | None = None
    ablation: str | None = None
    seed: int | None = None

    def flags(self) -> list[str]:
        if self.schedule is None:
            return []
        if "budget_fraction" in self.schedule:
            flags = ["--budget-fraction", f"{self.schedule['budget_fraction']:.6f}"]
        else:
            flags = ["--vision-token-budget", f"{self.schedule['vision_token_budget']:.6f}"]
        flags += ["--prune-method", self.schedule.get("method", "adsc")]
        if self.schedule["prune_layers"]:
            flags += ["--prune-layers", ",".join(map(str, self.schedule["prune_layers"]))]
        if self.schedule.get("selection"):
            flags += ["--prune-selection", self.schedule["selection"]]
        return flags


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected distinct non-negative integers")
    return seeds


def _merge(lora_dir: str, base: str, out: str) -> None:
    from llava.tools.merge_lora_weights import merge_lora

    if os.path.exists(out):
        shutil.rmtree(out)
    merge_lora(lora_dir, base, out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=None, help="run folder under playground/runs (default: default / smoke)")
    parser.add_argument("--arch", default="llava", choices=ARCHITECTURES,
                        help="llava (LLaVA-1.5, default) or qwen2_5_vl (transformers' Qwen2.5-VL on images of varying "
                             "size; run folder runs/qwen2_5_vl)")
    parser.add_argument("--smoke", action="store_true", help="a few minutes, for CI")
    parser.add_argument("--ablations", action="store_true",
                        help="add Tables II/III (full FT, standard/direct curricula) and the fine-tuned baselines")
    parser.add_argument("--baselines-finetuned", action="store_true",
                        help="fine-tune every baseline with ADSC's recipe at the ablation budget (1/9)")
    parser.add_argument("--seeds", default=None, type=_seed_list,
                        help="seeds of the ADSC fine-tunes, e.g. 0,1,2: each budget is fine-tuned once per seed "
                             "and reported as mean and spread (data, tower and full model keep --config's seed)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--config", default=None, help="JSON file of StudyConfig fields to override")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "playground"),
                        help="folder of runs/<name>/ and data/ (default: playground/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    overrides = {}
    if args.config:
        with open(args.config) as f:
            overrides.update(json.load(f))
        known = {f.name for f in dataclasses.fields(StudyConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            parser.error(f"{args.config}: unknown StudyConfig fields {unknown}; known: {sorted(known)}")
    if args.name:
        overrides["name"] = args.name
    if args.ablations:
        overrides["ablations"] = True
    if args.baselines_finetuned:
        overrides["baselines_finetuned"] = True
    if args.seeds is not None:
        overrides["finetune_seeds"] = args.seeds
    device = args.device or overrides.get("device") or (
        "cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("device cuda: CUDA is not available on this machine")
    overrides["device"] = device
    arch = overrides.pop("arch", None) or args.arch
    if args.arch != "llava" and arch != args.arch:
        parser.error(f"--arch {args.arch} and the config file's arch {arch!r} disagree")
    preset = "smoke" if args.smoke else "cuda" if device == "cuda" else "default"
    config = StudyConfig.for_arch(arch, preset, **overrides)
    start = time.time()
    try:
        study = Study(config, args.workdir)
    except ValueError as error:
        parser.error(str(error))
    summary = study.run()
    logger.info("study %s finished in %.1f min: %s", config.name, (time.time() - start) / 60,
                os.path.join(study.run_dir, "results.md"))
    print(summary["markdown"])
    return summary


if __name__ == "__main__":
    main()
