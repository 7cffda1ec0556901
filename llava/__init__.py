"""LLaVA-1.5 on current transformers, with ADSC vision-token pruning.

Module names, flags and file formats follow upstream LLaVA (haotian-liu/LLaVA) so its users
feel at home; the code is our own. The method itself lives in the separate ``adsc_patch``
package.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import llava.constants` stays light (no torch import).
    if name in ("LlavaLlamaForCausalLM", "LlavaConfig"):
        from .model import language_model

        return getattr(language_model.llava_llama, name)
    raise AttributeError(name)
