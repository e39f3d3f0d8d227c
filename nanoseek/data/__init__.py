"""Data: tokenizers, built-in verifiable tasks, datasets, packing loader."""
