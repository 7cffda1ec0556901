"""Merge a LoRA training output into a complete checkpoint (upstream's script, same flags).

    python scripts/merge_lora_weights.py --model-path OUT --model-base BASE --save-model-path MERGED

The work is done by ``llava.tools.merge_lora_weights``.
"""

from llava.tools.merge_lora_weights import main

if __name__ == "__main__":
    main()
