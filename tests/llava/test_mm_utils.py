import numpy as np
import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import (
    ImageLoadError,
    expand2square,
    get_model_name_from_path,
    load_image,
    process_images,
    tokenizer_image_token,
)


def test_tokenizer_image_token_puts_markers_between_chunks_with_one_bos(loaded_tiny):
    tokenizer = loaded_tiny[0]
    ids = tokenizer_image_token("USER: <image>\nWhat? <image> ASSISTANT:", tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    first = ids.index(IMAGE_TOKEN_INDEX)
    second = ids.index(IMAGE_TOKEN_INDEX, first + 1)
    assert ids[1:first] == tokenizer("USER: ", add_special_tokens=False).input_ids
    assert ids[first + 1 : second] == tokenizer("\nWhat? ", add_special_tokens=False).input_ids
    tensor = tokenizer_image_token("<image>\nx", tokenizer, return_tensors="pt")
    assert isinstance(tensor, torch.Tensor) and tensor[1].item() == IMAGE_TOKEN_INDEX


def test_expand2square_centres_on_the_background_colour():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand2square(image, (1, 2, 3))
    assert square.size == (40, 40)
    pixels = np.asarray(square)
    assert tuple(pixels[0, 0]) == (1, 2, 3) and tuple(pixels[20, 20]) == (255, 0, 0)
    assert tuple(pixels[9, 20]) == (1, 2, 3) and tuple(pixels[10, 20]) == (255, 0, 0)
    assert expand2square(Image.new("RGB", (8, 8)), (0, 0, 0)).size == (8, 8)


def test_process_images_pads_with_the_mean_before_resizing(loaded_tiny):
    _, model, processor, _ = loaded_tiny
    wide = Image.new("RGB", (96, 24), (255, 255, 255))
    padded = process_images([wide], processor, model.config)
    assert padded.shape == (1, 3, 48, 48)
    # the top rows are the mean colour, which normalises to about zero
    assert padded[0, :, 0, :].abs().max() < 0.02
    cropped = process_images([wide], processor, type("cfg", (), {"image_aspect_ratio": None}))
    assert cropped[0, :, 0, :].min() > 1.0  # white everywhere after a centre crop


def test_load_image_names_missing_and_broken_files(tmp_path):
    with pytest.raises(ImageLoadError, match="not found: .*missing.png"):
        load_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="not a readable image: .*broken.jpg"):
        load_image(broken)
    good = tmp_path / "ok.png"
    Image.new("L", (4, 4)).save(good)
    assert load_image(good).mode == "RGB"


def test_model_name_from_path():
    assert get_model_name_from_path("/ckpts/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert get_model_name_from_path("/ckpts/run/checkpoint-500") == "run_checkpoint-500"
