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
from assistant.architecture import Architecture
from assistant.errors import BadDataset
from assistant.prompt import PromptRenderer


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
    """Pads a batch the way each family's model expects it.

    Per-token tensors (``input_ids``, ``attention_mask``, ``labels`` and extras such as Gemma3's
    ``token_type_ids`` or Qwen's ``mm_token_type_ids``: any tensor shaped like ``input_ids``) are
    right-padded. Image tensors are zero-padded on their inner axes (LLaVA-NeXT's patch count, Idefics3's
    image count) and joined along the first axis: one row per image for most families, one per sample
    where the contract says the processor stacks images per sample (a sample without images then gets an
    all-zero row, which those models skip as padding).
    """

    def __init__(self, pad_token_id: int, architecture: Architecture) -> None:
        self.fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
        self.architecture = architecture

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        length = max(int(example["input_ids"].shape[-1]) for example in examples)
        token_shape = {key for example in examples for key, value in example.items()
                       if key != "image_keys" and tuple(value.shape) == tuple(example["input_ids"].shape)}
        batch: dict[str, Any] = {key: self._pad_tokens(examples, key, length) for key in sorted(token_shape)}
        image_inputs = sorted({key for example in examples for key in example} - token_shape - {"image_keys"})
        for key in image_inputs:
            batch[key] = self._join_images(examples, key)
        batch["image_keys"] = [key for example in examples for key in example["image_keys"]]
        return batch

    def _pad_tokens(self, examples: Sequence[dict[str, Any]], key: str, length: int) -> Any:
        import torch

        first = next(example[key] for example in examples if key in example)
        rows = torch.full((len(examples), length), self.fill.get(key, 0), dtype=first.dtype)
        for row, example in enumerate(examples):
            values = example[key][0]
            rows[row, : values.shape[-1]] = values
        return rows

    def _join_images(self, examples: Sequence[dict[str, Any]], key: str) -> Any:
        import torch

        present = [example[key] for example in examples if key in example]
        inner = [max(int(t.shape[axis]) for t in present) for axis in range(1, present[0].dim())]
        parts = []
        for example in examples:
            if key in example:
                tensor = example[key]
            elif self.architecture.images_per_sample:
                tensor = torch.zeros((1, *inner), dtype=present[0].dtype)
            else:
                continue
            padded = torch.zeros((tensor.shape[0], *inner), dtype=tensor.dtype)
            padded[(slice(None), *(slice(0, size) for size in tensor.shape[1:]))] = tensor
            parts.append(padded)
        return torch.cat(parts, dim=0)


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
