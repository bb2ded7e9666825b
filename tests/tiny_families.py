"""Tiny random-weight vision-language models, one per transformers family.

Each ``save_tiny_<family>`` builds the family's real transformers model, config and processor classes at toy
sizes (text hidden 64, 2 layers; vision hidden 32) around the character-level tokenizer of ``tiny_models``, and
saves a plain HF directory that loads back with ``AutoConfig``, ``AutoModelForImageTextToText`` and
``AutoProcessor``. Weights are random, so outputs are gibberish, but each family's real placeholder expansion,
vision tower, projector and position scheme run, so code paths that differ per family get exercised offline.
Image processors are set so one small image expands to at most ~64 image tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tiny_models import SPECIAL_TOKENS, save_tiny_llava, tiny_tokenizer

CONTEXT = 2048
TEXT_SIZES: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2,
                              "max_position_embeddings": CONTEXT, "tie_word_embeddings": False}
# Small any-resolution grid for LLaVA-NeXT / OneVision: a 64x64 image picks 56x56 = 2x2 tiles of 28 px.
TINY_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def chat_template(image_placeholder: str) -> str:
    """A ChatML template emitting ``image_placeholder`` per image part; every turn ends with eos (``<|im_end|>``)."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image_placeholder +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def family_tokenizer(*special_tokens: str, **named_tokens: str) -> Any:
    """``tiny_tokenizer`` plus the family's own special tokens, each a single id.

    ``named_tokens`` (e.g. ``boi_token="<start_of_image>"``) also become tokenizer attributes (``boi_token``,
    ``boi_token_id``), which Gemma3's and InternVL's processors read; they are saved as top-level keys of
    tokenizer_config.json, the way real checkpoints declare them, so they survive ``AutoProcessor`` reloads.
    """
    from tokenizers import Regex, pre_tokenizers

    tokenizer = tiny_tokenizer()
    # tiny_tokenizer splits on Regex("."), which skips newlines, so a run like "\n\n" (Gemma3's image
    # wrapper, paragraph breaks) became one <unk>; split on every character instead.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokens = [*special_tokens, *(token for token in named_tokens.values() if token not in special_tokens)]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    if named_tokens:
        tokenizer._set_model_specific_special_tokens(named_tokens)  # no public setter for named extra tokens
    return tokenizer


def text_sizes(tokenizer: Any, **overrides: Any) -> dict[str, Any]:
    """Toy decoder sizes plus the tokenizer's vocabulary and eos/pad ids, for any text config class."""
    return {**TEXT_SIZES, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, **overrides}


def save_model(model_class: type, config: Any, tokenizer: Any, processor: Any, directory: Path,
               after_init: Callable[[Any], None] | None = None) -> Path:
    """Stamp eos/pad on the outer config before init (so generation_config inherits them), then save both.

    ``after_init`` may re-randomize weights a family initializes to zeros, which would make images invisible.
    """
    config.eos_token_id = tokenizer.eos_token_id
    if not isinstance(getattr(type(config), "pad_token_id", None), property):  # Idefics3/SmolVLM: deprecated property
        config.pad_token_id = tokenizer.pad_token_id
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    model = model_class(config)
    if after_init is not None:
        after_init(model)
    model.save_pretrained(directory)
    tokenizer.chat_template = processor.chat_template  # AutoTokenizer users get the family's template too
    processor.save_pretrained(directory)
    return directory


def save_tiny_llava_next(directory: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT: CLIP (28 px, patch 14) → MLP → Llama; anyres over 2x2 tiles of 28 px (≤ 24 tokens/image)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer()
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=28, patch_size=14, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision_config, text_config=LlamaConfig(**text_sizes(tokenizer)),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=TINY_PINPOINTS, vision_feature_select_strategy="default",
                             vision_feature_layer=-1, image_seq_length=4)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                              image_grid_pinpoints=TINY_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=chat_template("<image>\n"))
    return save_model(LlavaNextForConditionalGeneration, config, tokenizer, processor, directory)


def save_tiny_llava_onevision(directory: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision: SigLIP (28 px, patch 14) → MLP → Qwen2; anyres over 2x2 tiles (≤ 24 tokens/image)."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer("<video>")
    vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision_config, text_config=Qwen2Config(**text_sizes(tokenizer)),
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=TINY_PINPOINTS, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1)
    image_processor = LlavaOnevisionImageProcessor(size={"height": 28, "width": 28},
                                                   image_grid_pinpoints=TINY_PINPOINTS)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28})
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor, num_image_tokens=4,
                                        vision_feature_select_strategy="full",
                                        chat_template=chat_template("<image>\n"))
    return save_model(LlavaOnevisionForConditionalGeneration, config, tokenizer, processor, directory)


QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Qwen image processors resize to multiples of patch * merge; cap pixels so one image is at most 64 merged tokens.
QWEN2_PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}


# head_dim 16 → 8 rotary frequencies, split over (t, h, w) as the real [16, 24, 24] is over 64.
QWEN2_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def qwen_ids(tokenizer: Any) -> dict[str, int]:
    """The four Qwen vision token ids, as the outer config wants them."""
    ids = tokenizer.convert_tokens_to_ids
    return {"vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>"),
            "image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>")}


def save_tiny_qwen2_vl(directory: Path, seed: int = 0) -> Path:
    """Qwen2-VL: ViT (patch 14, 2x2 merge) with M-RoPE text; a 64x64 image is 4 tokens, at most 64."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLTextConfig,
        Qwen2VLVideoProcessor,
        Qwen2VLVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer(*QWEN_TOKENS)
    text_config = Qwen2VLTextConfig(**text_sizes(tokenizer, rope_parameters=QWEN2_MROPE))
    vision_config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **qwen_ids(tokenizer))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN2_PIXELS), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**QWEN2_PIXELS),
                                 chat_template=chat_template(QWEN_IMAGE))
    return save_model(Qwen2VLForConditionalGeneration, config, tokenizer, processor, directory)


def save_tiny_qwen2_5_vl(directory: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL: windowed ViT (patch 14, 2x2 merge, one full-attention block) with M-RoPE text."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer(*QWEN_TOKENS)
    text_config = Qwen2_5_VLTextConfig(**text_sizes(tokenizer, rope_parameters=QWEN2_MROPE))
    vision_config = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **qwen_ids(tokenizer))
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN2_PIXELS), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**QWEN2_PIXELS),
                                    chat_template=chat_template(QWEN_IMAGE))
    return save_model(Qwen2_5_VLForConditionalGeneration, config, tokenizer, processor, directory)


def save_tiny_qwen3_vl(directory: Path, seed: int = 0) -> Path:
    """Qwen3-VL: ViT (patch 16, 2x2 merge, learned 8x8 position grid, one deepstack layer) with interleaved M-RoPE."""
    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLTextConfig,
        Qwen3VLVideoProcessor,
        Qwen3VLVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer(*QWEN_TOKENS)
    # head_dim 16 → 8 rotary frequencies, interleaved over (t, h, w) as the real [24, 20, 20] is over 64.
    text_config = Qwen3VLTextConfig(**text_sizes(tokenizer, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True}))
    vision_config = Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                        out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                                        temporal_patch_size=2, num_position_embeddings=64,
                                        deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **qwen_ids(tokenizer))
    pixels = {"size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}, "patch_size": 16,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(**pixels),
                                 chat_template=chat_template(QWEN_IMAGE))
    return save_model(Qwen3VLForConditionalGeneration, config, tokenizer, processor, directory)


IDEFICS_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
# 64 px images, patch 8 → 8x8 patches, pixel shuffle by 2 → 16 tokens; no splitting into sub-images.
IDEFICS_IMAGES: dict[str, Any] = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 64},
                                  "do_image_splitting": False}


def idefics_vision_sizes() -> dict[str, Any]:
    """SigLIP-like tower sizes shared by Idefics3 and SmolVLM (the image side equals ``max_image_size``)."""
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 64, "patch_size": 8}


def save_tiny_idefics3(directory: Path, seed: int = 0) -> Path:
    """Idefics3: SigLIP-like tower (64 px, patch 8) → pixel-shuffle connector → Llama; 16 tokens per image."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer(*IDEFICS_TOKENS)
    config = Idefics3Config(vision_config=Idefics3VisionConfig(**idefics_vision_sizes()),
                            text_config=LlamaConfig(**text_sizes(tokenizer)), scale_factor=2,
                            pad_token_id=tokenizer.pad_token_id,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(**IDEFICS_IMAGES), tokenizer=tokenizer,
                                  image_seq_len=16, chat_template=chat_template("<image>"))
    # The processor re-adds its tokens with replace_extra_special_tokens=True, dropping ChatML's from the list.
    tokenizer.add_special_tokens({"additional_special_tokens": [*SPECIAL_TOKENS, *IDEFICS_TOKENS]},
                                 replace_extra_special_tokens=False)
    return save_model(Idefics3ForConditionalGeneration, config, tokenizer, processor, directory)


def save_tiny_smolvlm(directory: Path, seed: int = 0) -> Path:
    """SmolVLM: Idefics3's layout under its own classes (processor needs ``num2words``); 16 tokens per image."""
    import torch
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
        SmolVLMVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer(*IDEFICS_TOKENS, "<video>")
    config = SmolVLMConfig(vision_config=SmolVLMVisionConfig(**idefics_vision_sizes()),
                           text_config=LlamaConfig(**text_sizes(tokenizer)), scale_factor=2,
                           pad_token_id=tokenizer.pad_token_id,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    video_processor = SmolVLMVideoProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 64})
    processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**IDEFICS_IMAGES), tokenizer=tokenizer,
                                 video_processor=video_processor, image_seq_len=16,
                                 chat_template=chat_template("<image>"))
    return save_model(SmolVLMForConditionalGeneration, config, tokenizer, processor, directory)


def save_tiny_gemma3(directory: Path, seed: int = 0) -> Path:
    """Gemma3: SigLIP (64 px, patch 8) → avg-pool 2x2 projector → Gemma3 text; 16 soft tokens per image.

    The chat text holds ``<start_of_image>``; the processor expands it to
    ``\\n\\n<start_of_image><image_soft_token>*16<end_of_image>\\n\\n`` and returns ``token_type_ids``.
    """
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer(boi_token="<start_of_image>", image_token="<image_soft_token>",
                                 eoi_token="<end_of_image>")
    text_config = Gemma3TextConfig(**text_sizes(tokenizer, head_dim=16, query_pre_attn_scalar=16,
                                                sliding_window=512,
                                                layer_types=["sliding_attention", "full_attention"]))
    vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=64, patch_size=8, vision_use_head=False)
    config = Gemma3Config(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=16,
                          boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                          image_token_index=tokenizer.image_token_id)
    image_processor = Gemma3ImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5, 0.5, 0.5],
                                           image_std=[0.5, 0.5, 0.5])
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16,
                                chat_template=chat_template("<start_of_image>"))
    return save_model(Gemma3ForConditionalGeneration, config, tokenizer, processor, directory,
                      after_init=randomize_gemma3_projection)


def randomize_gemma3_projection(model: Any) -> None:
    """Gemma3 initializes ``mm_input_projection_weight`` to zeros: every image would embed to zero."""
    import torch

    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=model.config.initializer_range)


def save_tiny_mistral3(directory: Path, seed: int = 0) -> Path:
    """Mistral3: Pixtral tower (patch 8, 2D RoPE) → 2x2 patch merger → Mistral; a 64x64 image is 4x4 ``[IMG]``.

    The processor expands ``[IMG]`` row by row, each row closed by ``[IMG_BREAK]`` and the last by ``[IMG_END]``.
    """
    import torch
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer("[IMG]", "[IMG_BREAK]", "[IMG_END]")
    vision_config = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, head_dim=16, image_size=64, patch_size=8)
    config = Mistral3Config(vision_config=vision_config, text_config=MistralConfig(**text_sizes(tokenizer)),
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
                            vision_feature_layer=-1)
    image_processor = PixtralImageProcessor(size={"longest_edge": 64}, patch_size={"height": 16, "width": 16})
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                 spatial_merge_size=2, chat_template=chat_template("[IMG]"))
    return save_model(Mistral3ForConditionalGeneration, config, tokenizer, processor, directory)


def save_tiny_internvl(directory: Path, seed: int = 0) -> Path:
    """InternVL: InternViT (64 px, patch 8) → pixel-shuffle 0.5 → MLP → Qwen2; one 64 px tile, 16 tokens.

    The chat text holds ``<IMG_CONTEXT>``; the processor expands it to ``<img><IMG_CONTEXT>*16</img>``.
    """
    import torch
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    tokenizer = family_tokenizer(start_image_token="<img>", end_image_token="</img>",
                                 context_image_token="<IMG_CONTEXT>", video_token="<video>")
    vision_config = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=[64, 64], patch_size=[8, 8])
    config = InternVLConfig(vision_config=vision_config, text_config=Qwen2Config(**text_sizes(tokenizer)),
                            image_token_id=tokenizer.context_image_token_id, image_seq_length=16,
                            downsample_ratio=0.5, vision_feature_layer=-1)
    image_processor = GotOcr2ImageProcessor(size={"height": 64, "width": 64}, crop_to_patches=False,
                                            max_patches=1)
    video_processor = InternVLVideoProcessor(size={"height": 64, "width": 64})
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, image_seq_length=16,
                                  chat_template=chat_template("<IMG_CONTEXT>\n"))
    return save_model(InternVLForConditionalGeneration, config, tokenizer, processor, directory)


FAMILY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llava": save_tiny_llava,
    "llava_next": save_tiny_llava_next,
    "llava_onevision": save_tiny_llava_onevision,
    "qwen2_vl": save_tiny_qwen2_vl,
    "qwen2_5_vl": save_tiny_qwen2_5_vl,
    "qwen3_vl": save_tiny_qwen3_vl,
    "idefics3": save_tiny_idefics3,
    "smolvlm": save_tiny_smolvlm,
    "gemma3": save_tiny_gemma3,
    "mistral3": save_tiny_mistral3,
    "internvl": save_tiny_internvl,
}
