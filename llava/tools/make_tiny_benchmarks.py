"""Write a handful of questions per benchmark in upstream LLaVA's ``playground/data/eval`` layout.

    python -m llava.tools.make_tiny_benchmarks --out playground/data/eval [--per-benchmark 4]

Same file names and formats as the real benchmarks (GQA, MME, POPE, ScienceQA, TextVQA,
VQAv2 test-dev and val), with generated images of coloured shapes, so that every
``scripts/v1_5/eval/*.sh`` runs end to end on a machine without the real data.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from PIL import Image, ImageDraw

SHORT = "\nAnswer the question using a single word or phrase."
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def _image(path: str, rng: random.Random) -> tuple[str, str]:
    """Draw one shape; returns (colour, shape)."""
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(["circle", "square"])
    image = Image.new("RGB", (rng.randint(48, 96), rng.randint(48, 96)), "white")
    w, h = image.size
    box = (w // 6, h // 6, 5 * w // 6, 5 * h // 6)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return colour, shape


def _write_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _gqa(root: str, n: int, rng: random.Random) -> None:
    questions, truth = [], {}
    for i in range(n):
        image_id = f"n{1000 + i}"
        colour, shape = _image(f"{root}/gqa/data/images/{image_id}.jpg", rng)
        qid = str(20000000 + i)
        verify = i % 2 == 1
        text = f"Is the {shape} {colour}?" if verify else f"What color is the {shape}?"
        questions.append({"question_id": qid, "image": f"{image_id}.jpg", "text": text + SHORT})
        truth[qid] = {
            "imageId": image_id, "question": text, "answer": "yes" if verify else colour, "isBalanced": True,
            "types": {"structural": "verify" if verify else "query", "semantic": "attr",
                      "detailed": "verifyAttr" if verify else "queryAttr"},
        }
    _write_jsonl(f"{root}/gqa/llava_gqa_testdev_balanced.jsonl", questions)
    _write_json(f"{root}/gqa/data/testdev_balanced_questions.json", truth)


def _mme(root: str, n: int, rng: random.Random) -> None:
    """One image (two questions) per subtask: the scorer needs all 14."""
    from llava.eval.eval_mme import COGNITION, PERCEPTION

    base = f"{root}/MME/MME_Benchmark_release_version"
    questions = []
    for category in PERCEPTION + COGNITION:
        name = "0001.png"
        colour, shape = _image(f"{base}/{category}/{name}", rng)
        other = next(c for c in sorted(COLOURS) if c != colour)
        pairs = [(f"Is there a {colour} {shape} in this image?", "Yes"),
                 (f"Is there a {other} {shape} in this image?", "No")]
        with open(f"{base}/{category}/0001.txt", "w") as f:
            for question, answer in pairs:
                f.write(f"{question} Please answer yes or no.\t{answer}\n")
        for question, _ in pairs:
            questions.append({"question_id": f"{category}/{name}", "image": f"{category}/{name}",
                              "text": question + SHORT, "category": category})
    _write_jsonl(f"{root}/MME/llava_mme.jsonl", questions)


def _pope(root: str, n: int, rng: random.Random) -> None:
    questions, qid = [], 0
    for split in ("adversarial", "popular", "random"):
        annotations = []
        for i in range(n):
            name = f"COCO_val2014_{split[:3]}{i:09d}.jpg"
            colour, shape = _image(f"{root}/pope/val2014/{name}", rng)
            present = i % 2 == 0
            obj = shape if present else ("square" if shape == "circle" else "circle")
            text = f"Is there a {obj} in the image?"
            annotations.append({"question_id": i + 1, "image": name, "text": text, "label": "yes" if present else "no"})
            qid += 1
            questions.append({"question_id": qid, "image": name, "text": text + SHORT, "category": split})
        _write_jsonl(f"{root}/pope/coco/coco_pope_{split}.json", annotations)
    _write_jsonl(f"{root}/pope/llava_pope_test.jsonl", questions)


def _scienceqa(root: str, n: int, rng: random.Random) -> None:
    problems, conversations, pids = {}, [], []
    for i in range(n):
        pid = str(100 + i)
        with_image = i % 4 != 3
        choices = sorted(COLOURS)[:3]
        answer = rng.randrange(3)
        record = {"question": "Which color is shown?", "choices": choices, "answer": answer, "hint": "",
                  "image": None, "subject": "natural science", "split": "test"}
        if with_image:
            _image(f"{root}/scienceqa/images/test/{pid}/image.png", rng)
            record["image"] = "image.png"
        problems[pid] = record
        pids.append(pid)
        options = "\n".join(f"{chr(65 + k)}. {c}" for k, c in enumerate(choices))
        value = f"Context: none\nWhich color is shown?\n{options}"
        item = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if with_image else "") + value},
                                             {"from": "gpt", "value": f"The answer is {chr(65 + answer)}."}]}
        if with_image:
            item["image"] = f"{pid}/image.png"
        conversations.append(item)
    _write_json(f"{root}/scienceqa/problems.json", problems)
    _write_json(f"{root}/scienceqa/pid_splits.json", {"test": pids, "val": [], "train": []})
    _write_json(f"{root}/scienceqa/llava_test_CQM-A.json", conversations)


def _textvqa(root: str, n: int, rng: random.Random) -> None:
    questions, data = [], []
    for i in range(n):
        image_id = f"{i:016x}"
        colour, _ = _image(f"{root}/textvqa/train_images/{image_id}.jpg", rng)
        text = "What is written on the sign?"
        word = rng.choice(["stop", "open", "exit", "sale"])
        questions.append({"question_id": 34602 + i, "image": f"{image_id}.jpg",
                          "text": f"{text}\nReference OCR token: {word.upper()}, {colour}{SHORT}"})
        answers = [word] * 7 + [colour] * 3
        data.append({"question_id": 34602 + i, "image_id": image_id, "question": text, "answers": answers})
    _write_jsonl(f"{root}/textvqa/llava_textvqa_val_v051_ocr.jsonl", questions)
    _write_json(f"{root}/textvqa/TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_version": "0.5.1",
                                                           "dataset_type": "val", "data": data})


def _vqav2(root: str, n: int, rng: random.Random) -> None:
    test, annotations, val = [], [], []
    for i in range(2 * n):
        name = f"COCO_test2015_{i:012d}.jpg"
        colour, shape = _image(f"{root}/vqav2/test2015/{name}", rng)
        test.append({"question_id": 1000 + i, "image": name, "text": f"What color is the {shape}?" + SHORT})
    _write_jsonl(f"{root}/vqav2/llava_vqav2_mscoco_test2015.jsonl", test)
    _write_jsonl(f"{root}/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", test[:n])
    for i in range(n):
        name = f"COCO_val2014_{i:012d}.jpg"
        colour, shape = _image(f"{root}/vqav2/val2014/{name}", rng)
        val.append({"question_id": 5000 + i, "image": name, "text": f"What color is the {shape}?" + SHORT})
        humans = [colour] * 8 + ["orange", "dark " + colour]
        annotations.append({
            "question_id": 5000 + i, "image_id": i, "question_type": "what color is the",
            "answer_type": "other", "multiple_choice_answer": colour,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(humans)],
        })
    _write_jsonl(f"{root}/vqav2/llava_vqav2_mscoco_val2014.jsonl", val)
    _write_json(f"{root}/vqav2/v2_mscoco_val2014_annotations.json", {"annotations": annotations})


BENCHMARKS = {"gqa": _gqa, "mme": _mme, "pope": _pope, "scienceqa": _scienceqa, "textvqa": _textvqa, "vqav2": _vqav2}


def make_tiny_benchmarks(out: str, per_benchmark: int = 4, seed: int = 0) -> str:
    rng = random.Random(seed)
    for make in BENCHMARKS.values():
        make(out, per_benchmark, rng)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the eval root, e.g. playground/data/eval")
    parser.add_argument("--per-benchmark", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_tiny_benchmarks(args.out, args.per_benchmark, args.seed)
    print(f"wrote {args.per_benchmark} questions each of {', '.join(BENCHMARKS)} (upstream's layout) under {out}; "
          f"point the eval scripts at it with EVAL_DIR={out}")


if __name__ == "__main__":
    main()
