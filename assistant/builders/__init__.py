"""Builders: they make model directories that plain loading then reads, and are never part of loading.

``vision_tower`` converts the offline DINOv2 ONNX file to a transformers ``Dinov2Model``, ``compose``
joins any causal LM and vision tower into a LLaVA (``iris build``), and ``default_model`` assembles the
embedded default (SmolLM2 + DINOv2 + shipped projector/LoRA) once into the cache.
"""
