"""Turning a trained adapter into artifacts: LoRA, merged, GGUF, and the Hub push."""
