"""LoRA adapters: training data formats, synthetic data, training, manifests and export."""
