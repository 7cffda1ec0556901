import pytest

from llava.conversation import conv_templates, get_conv_template

SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def test_vicuna_v1_single_turn_prompt():
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is it?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == f"{SYSTEM_USER} USER: <image>\nWhat is it? ASSISTANT:"


def test_vicuna_v1_training_text_for_two_rounds():
    conv = conv_templates["v1"].copy()
    for q, a in (("<image>\nQ1", "A1"), ("Q2", "A2")):
        conv.append_message(conv.roles[0], q)
        conv.append_message(conv.roles[1], a)
    assert conv.get_prompt() == f"{SYSTEM_USER} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"


def test_llava_v1_says_human():
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "Hi")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == SYSTEM_USER.replace("user", "human") + " USER: Hi ASSISTANT:"


def test_plain_is_image_then_caption():
    conv = conv_templates["plain"].copy()
    conv.append_message(conv.roles[0], "<image>")
    conv.append_message(conv.roles[1], "A dog on a beach.")
    assert conv.get_prompt() == "<image>\nA dog on a beach.\n"


def test_copies_do_not_share_messages_and_unknown_names_fail():
    a = get_conv_template("vicuna_v1")
    a.append_message("USER", "x")
    assert get_conv_template("vicuna_v1").messages == []
    with pytest.raises(ValueError, match="unknown conversation template 'mpt'"):
        get_conv_template("mpt")
