"""Dataset stage: load rows, turn them into chat conversations, tokenize for training."""
