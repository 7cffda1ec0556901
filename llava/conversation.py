"""Conversation templates with upstream LLaVA's names and exact prompt strings.

``conv_templates["vicuna_v1"].copy()`` gives a fresh conversation; ``append_message(role,
text)`` adds a turn (``None`` text leaves the assistant turn open) and ``get_prompt()``
renders it. Single-turn ``vicuna_v1`` prompt::

    <system> USER: <image>\\n<question> ASSISTANT:

Training text (two rounds)::

    <system> USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>
"""

from __future__ import annotations

import copy
import dataclasses
from enum import Enum, auto


class SeparatorStyle(Enum):
    """How turns are joined (upstream names)."""

    SINGLE = auto()
    TWO = auto()
    PLAIN = auto()


@dataclasses.dataclass
class Conversation:
    """A chat in one template; ``messages`` is a list of ``[role, text_or_None]``."""

    system: str
    roles: tuple[str, str]
    messages: list[list]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def get_prompt(self) -> str:
        return self.render()[0]

    def render(self) -> tuple[str, list[tuple[int, int]]]:
        """The prompt and the character spans a model is trained to produce.

        Spans cover each assistant reply with its leading space and closing separator
        (``" A1</s>"`` in ``vicuna_v1``); in ``plain`` the second message and its separator.
        """
        messages = [(role, _text(message)) for role, message in self.messages]
        spans: list[tuple[int, int]] = []
        if self.sep_style in (SeparatorStyle.TWO, SeparatorStyle.SINGLE):
            seps = (self.sep, self.sep2) if self.sep_style == SeparatorStyle.TWO else (self.sep, self.sep)
            out = self.system + seps[0]
            for i, (role, text) in enumerate(messages):
                if not text:
                    out += f"{role}:"
                    continue
                out += f"{role}:"
                start = len(out)
                out += f" {text}{seps[i % 2]}"
                if i % 2 == 1:
                    spans.append((start, len(out)))
            return out, spans
        if self.sep_style == SeparatorStyle.PLAIN:
            seps = (self.sep, self.sep2 if self.sep2 is not None else self.sep)
            out = self.system
            for i, (_, text) in enumerate(messages):
                if text:
                    start = len(out)
                    out += text + seps[i % 2]
                    if i % 2 == 1:
                        spans.append((start, len(out)))
            return out, spans
        raise ValueError(f"unknown separator style {self.sep_style}")

    def append_message(self, role: str, message) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=copy.deepcopy(self.messages))

    def dict(self) -> dict:
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, _text(m)] for role, m in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


def _text(message):
    # Upstream's web demo stores (text, image, mode) tuples; only the text goes in the prompt.
    return message[0] if isinstance(message, tuple) else message


conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_v1 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
    version="plain",
)

default_conversation = conv_vicuna_v1
conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v1,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llava_v1": conv_llava_v1,
    "plain": conv_llava_plain,
}


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of template ``name``, with a clear error for unknown names."""
    try:
        return conv_templates[name].copy()
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(conv_templates)}") from None
