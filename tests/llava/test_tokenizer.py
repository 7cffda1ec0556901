"""A LLaVA-1.5 style tokenizer folder (sentencepiece tokenizer.model only) tokenises like Llama's."""

import io
import json

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llava.model.builder import load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "USER: What is in the image? ASSISTANT: A red bus parked near 42 trees.",
    "Answer the question using a single word or phrase.",
    "café naïve résumé – emoji 🙂 and tabs\there",
] * 40

TEXTS = [
    "Hello world",
    "USER: What is in the image? ASSISTANT:",
    "A chat between a curious user and an artificial intelligence assistant.",
    "numbers 1234567 and 3.14",
    "multiple   spaces  and\nnew\nlines",
    "unicode: café, 日本語, 🙂",
    "\nAnswer the question using a single word or phrase.",
]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    """Train a small Llama-style sentencepiece model and write it as LLaVA-1.5 ships it."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("sp_tokenizer")
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 2048, "padding_side": "right",
    }))
    return folder


@pytest.fixture(scope="module")
def sentencepiece(sp_folder):
    return spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def sentencepiece_no_prefix(sp_folder):
    """The same model without the dummy prefix: how Llama (legacy=False) reads text after a special token."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((sp_folder / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def test_folder_has_no_tokenizer_json(sp_folder):
    assert not (sp_folder / "tokenizer.json").exists()


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_like_sentencepiece_with_bos(sp_folder, sentencepiece, text):
    tokenizer = load_tokenizer(str(sp_folder))
    assert tokenizer(text).input_ids == [1] + sentencepiece.encode(text)
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_special_tokens_in_text_are_split_out_without_a_new_prefix(sp_folder, sentencepiece, sentencepiece_no_prefix):
    tokenizer = load_tokenizer(str(sp_folder))
    ids = tokenizer("A cat.</s>USER: hi").input_ids
    assert ids == [1] + sentencepiece.encode("A cat.") + [2] + sentencepiece_no_prefix.encode("USER: hi")


def test_missing_pad_token_falls_back_to_unk(sp_folder):
    tokenizer = load_tokenizer(str(sp_folder))
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0
