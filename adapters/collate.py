"""Samples → padded training batches, with a seeded per-epoch shuffle that a resumed run can replay.

Each sample is encoded by ``PromptRenderer.training_example`` (the model's own chat template, labels
only on assistant tokens). A batch also carries ``image_keys`` (the SHA-256 of each image, in
pixel-row order) so frozen vision-tower features can be cached per image.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from adapters.dataset import Sample
from assistant.errors import BadDataset
from assistant.prompt import PromptRenderer

TEXT_KEYS = ("input_ids", "attention_mask", "labels")


def split_samples(samples: Sequence[Sample], eval_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): a seeded random ``eval_fraction`` of the samples is held out (at least one if > 0)."""
    if eval_fraction <= 0:
        return list(samples), []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(samples) * eval_fraction))
    if held >= len(samples):
        raise BadDataset(f"--eval-split {eval_fraction} leaves no training samples out of {len(samples)}")
    held_out = set(order[:held])
    return ([s for i, s in enumerate(samples) if i not in held_out],
            [s for i, s in enumerate(samples) if i in held_out])


class EncodedDataset:
    """Map-style dataset: sample ``i`` encoded on demand (pixel values are too big to keep for a real set)."""

    def __init__(self, samples: Sequence[Sample], renderer: PromptRenderer) -> None:
        self.samples = list(samples)
        self.renderer = renderer

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        messages = self.samples[index].messages
        example = self.renderer.training_example(messages)
        example["image_keys"] = [image.sha256 for message in messages for image in message.images]
        return example

    def check_lengths(self, limit: int) -> None:
        """Refuse, naming the sample, any conversation longer than the model's context (it would be cut)."""
        for sample in self.samples:
            length = self.renderer.count(sample.messages, add_generation_prompt=False)
            if length > limit:
                raise BadDataset(f"{sample.source}: {length} tokens, longer than the model's context ({limit})")


class Collator:
    """Right-pads text tensors (labels with -100) and concatenates image tensors along their first axis."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(int(example["input_ids"].shape[-1]) for example in examples)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100}
        batch: dict[str, Any] = {}
        for key in TEXT_KEYS:
            rows = torch.full((len(examples), length), fill[key], dtype=torch.long)
            for row, example in enumerate(examples):
                values = example[key][0]
                rows[row, : values.shape[-1]] = values
            batch[key] = rows
        extra = sorted({key for example in examples for key in example} - set(TEXT_KEYS) - {"image_keys"})
        for key in extra:
            parts = [example[key] for example in examples if key in example]
            batch[key] = torch.cat(parts, dim=0)
        batch["image_keys"] = [key for example in examples for key in example["image_keys"]]
        return batch


class EpochSampler:
    """A permutation of the dataset seeded by (seed, epoch): the same order again after a resume."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return iter(order)
