from . import llava_llama
from .llava_llama import LlavaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel

__all__ = ["llava_llama", "LlavaConfig", "LlavaLlamaForCausalLM", "LlavaLlamaModel"]
