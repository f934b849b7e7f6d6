"""The embedded default: a bundled synthetic corpus and a small GPT-2 trained on it."""
