"""Write a small LLaVA-format instruction dataset of coloured shapes, for smoke tests.

    python -m llava.tools.make_tiny_dataset --out DIR [--samples 36] [--seed 0]

Writes ``DIR/data.json`` (upstream's format: id, image, conversations) and
``DIR/images/*.png``. Most samples ask about the shape's colour or kind (one or two
rounds); every sixth sample is text only.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220)}
SHAPES = ("circle", "square")


def _draw(shape: str, colour: str, rng: random.Random, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    margin = rng.randint(4, 16)
    box = (margin, margin, size - margin, size - margin)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def make_tiny_dataset(out: str, samples: int = 36, seed: int = 0) -> str:
    """Write the dataset to ``out``; returns the path of its JSON file."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    records = []
    for index in range(samples):
        if index % 6 == 5:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            records.append({
                "id": f"text-{index}",
                "conversations": [
                    {"from": "human", "value": f"What is {a} plus {b}?"},
                    {"from": "gpt", "value": f"{a + b}."},
                ],
            })
            continue
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        name = f"images/{index:04d}.png"
        _draw(shape, colour, rng).save(os.path.join(out, name))
        first = rng.choice([f"<image>\nWhat color is the shape?", f"What color is the shape?\n<image>"])
        conversations = [
            {"from": "human", "value": first},
            {"from": "gpt", "value": f"{colour.capitalize()}."},
        ]
        if index % 2:
            conversations += [
                {"from": "human", "value": "And what shape is it?"},
                {"from": "gpt", "value": f"A {shape}."},
            ]
        records.append({"id": f"shape-{index}", "image": name, "conversations": conversations})
    path = os.path.join(out, "data.json")
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_dataset(args.out, args.samples, args.seed))


if __name__ == "__main__":
    main()
