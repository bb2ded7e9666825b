"""Samples/s of `iris train` (adapters.train) vs a plain transformers ``Trainer`` + peft loop.

Same tiny LLaVA, same 16-sample synthetic dataset, same LoRA config (projector in
``modules_to_save``), same batch size, steps, optimizer and encoding; runs alternate
(A B A B, after one untimed warm-up of each) and the best of each is compared, since this machine
is shared and noisy. Both timings cover the training loop only (model loading excluded); the iris
one also includes writing the adapter, manifest and loss plot.
Prints the ratio iris / Trainer (> 1: iris is faster). Under 2 minutes on 2 CPUs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STEPS, BATCH, ROUNDS = 24, 4, 2


def iris_rate(work: Path, model_dir: Path, data: Path, run: int, cache: bool) -> float:
    from adapters.train import TrainOptions, train

    result = train(TrainOptions(data=data, out=work / f"iris-{cache}-{run}", model=str(model_dir), steps=STEPS,
                                stage="lora", batch_size=BATCH, lora_r=8, lora_alpha=16, cache_features=cache),
                   show_progress=False)
    return STEPS * BATCH / result.seconds


def trainer_rate(work: Path, model_dir: Path, data: Path, run: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

    from adapters.collate import Collator, EncodedDataset
    from adapters.dataset import read_dataset
    from assistant.architecture import describe_model
    from assistant.prompt import PromptRenderer

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    architecture = describe_model(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=architecture.lora_targets(),
                                             modules_to_save=[architecture.projector]))
    dataset = EncodedDataset(read_dataset(data), PromptRenderer(processor.tokenizer, processor))
    collate = Collator(processor.tokenizer.pad_token_id, architecture)

    def collate_for_trainer(examples: list[dict]) -> dict:
        batch = collate(examples)
        batch.pop("image_keys")
        return batch

    args = TrainingArguments(output_dir=str(work / f"trainer-{run}"), max_steps=STEPS,
                             per_device_train_batch_size=BATCH, learning_rate=2e-4, lr_scheduler_type="cosine",
                             warmup_steps=1, weight_decay=0.0,
                             max_grad_norm=1.0, save_strategy="no", report_to=[], use_cpu=True, logging_steps=STEPS,
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate_for_trainer)
    started = time.perf_counter()
    trainer.train()
    return STEPS * BATCH / (time.perf_counter() - started)


def main() -> None:
    from tiny_models import save_tiny_llava

    from adapters.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = save_tiny_llava(work / "llava")
        data = synthesize(work / "data", 16, seed=0).parent
        rates: dict[str, list[float]] = {"iris": [], "iris --cache-features": [], "Trainer": []}
        iris_rate(work, model_dir, data, -1, cache=False)  # warm-up: first-use costs land here
        trainer_rate(work, model_dir, data, -1)
        for run in range(ROUNDS):
            rates["iris"].append(iris_rate(work, model_dir, data, run, cache=False))
            rates["Trainer"].append(trainer_rate(work, model_dir, data, run))
            rates["iris --cache-features"].append(iris_rate(work, model_dir, data, run, cache=True))
        best = {name: max(values) for name, values in rates.items()}
        for name, value in best.items():
            print(f"{name:>22}: {value:7.1f} samples/s (runs: {', '.join(f'{v:.1f}' for v in rates[name])})")
        print(f"ratio iris / Trainer: {best['iris'] / best['Trainer']:.2f}")
        print(f"ratio iris --cache-features / Trainer: {best['iris --cache-features'] / best['Trainer']:.2f}")


if __name__ == "__main__":
    main()
