"""Iris core: model loading, vision input, prompts, generation, dialogue and storage."""
