"""Tiny real models built in-process: a character-level tokenizer with a chat template,
a tiny Llama, and a tiny LLaVA (CLIP tower + projector + Llama) with its processor.

Weights are random, so outputs are gibberish, but every code path (chat
template, image placeholder expansion, 4-bit layers, LoRA, streaming) is real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


def tiny_tokenizer() -> Any:
    """Character-level over printable ASCII, plus ChatML and ``<image>`` specials.

    Every token decodes to visible text, so outputs of random models can be compared as strings.
    """
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{char: index + 1 for index, char in enumerate(string.printable)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, context: int = 512) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                       tie_word_embeddings=False)


def save_tiny_llama(directory: Path, context: int = 512, seed: int = 0) -> Path:
    """A tiny random Llama + tokenizer saved as a plain HF directory."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = tiny_llama_config(len(tokenizer), context)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_llava(directory: Path, image_size: int = 28, patch_size: int = 14, context: int = 512,
                    seed: int = 0) -> Path:
    """A tiny random LLaVA: CLIP vision tower (patch 14) → MLP projector → Llama, plus its processor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_config = tiny_llama_config(len(tokenizer), context)
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                                     projection_dim=32)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    processor.save_pretrained(directory)
    return directory


def save_strong_lora(model_dir: Path, out: Path, seed: int, vision: bool = False) -> Path:
    """A LoRA adapter on q/v with large random weights, so it visibly changes a tiny model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    loader = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    base = loader.from_pretrained(model_dir)
    targets = r".*language_model.*\.(q_proj|v_proj)" if vision else ["q_proj", "v_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out
