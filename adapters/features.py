"""Frozen vision-tower features cached per image, and the loss as one ``nn.Module`` forward.

The vision tower never trains in Iris, so its output for an image is a constant: ``FeatureCache``
computes it once per image (by SHA-256) and the projector then runs on the cached features every
step, which gives the same loss as the model's own ``pixel_values`` path (tested) for less compute.
"""

from __future__ import annotations

from typing import Any

from assistant.architecture import Architecture


def _unwrap_peft(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class FeatureCache:
    """Frozen vision-tower outputs per image SHA-256: computed on first sight, reused every later epoch.

    Only families whose image features splice into the embeddings (the architecture contract says
    which) can cache; for the others the cache stays off (``enabled`` is False) and training runs the
    tower every step. The projector still runs (and trains) on the cached features every step.
    """

    def __init__(self, model: Any, architecture: Architecture, requested: bool) -> None:
        self.enabled = requested and architecture.splices_features
        self.architecture = architecture
        self.base = _unwrap_peft(model)
        self.features: dict[str, Any] = {}
        self.computed = 0

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Batch for the loss: ``image_features`` instead of ``pixel_values`` when caching."""
        import torch

        keys = batch.pop("image_keys")
        if not self.enabled or "pixel_values" not in batch:
            return batch
        pixels = batch.pop("pixel_values")
        missing = [row for row, key in enumerate(keys) if key not in self.features]
        if missing:
            with torch.no_grad():
                computed = self._tower(pixels[missing])
            for row, features in zip(missing, computed, strict=True):
                if keys[row] not in self.features:
                    self.features[keys[row]] = features.to("cpu")
                    self.computed += 1
        batch["image_features"] = torch.stack([self.features[key] for key in keys]).to(pixels.device)
        return batch

    def _tower(self, pixels: Any) -> Any:
        """The tower's selected hidden states, exactly as ``LlavaModel.get_image_features`` selects them."""
        import torch

        config = self.base.config
        assert self.architecture.vision_tower is not None
        tower = self.base.get_submodule(self.architecture.vision_tower)
        hidden = tower(pixels.to(tower.dtype), output_hidden_states=True, return_dict=True).hidden_states
        layers = config.vision_feature_layer
        pool = [hidden[layers]] if isinstance(layers, int) else [hidden[index] for index in layers]
        if config.vision_feature_select_strategy == "default":
            pool = [state[:, 1:] for state in pool]
        return torch.cat(pool, dim=-1)


def loss_module(model: Any, architecture: Architecture) -> Any:
    """An ``nn.Module`` whose forward returns the loss, so DDP sees every trainable use inside forward.

    Logits are computed only where a label follows (``logits_to_keep`` as a boolean mask): the answer tokens
    are a few percent of a multimodal sample, and the vocabulary projection of every other position is most of
    the LM head's cost. The loss is the mean over answer tokens, as the model's own ``labels`` loss is.
    """
    import torch

    class LossForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, labels: Any, image_features: Any = None,
                    **extra: Any) -> Any:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100
            if image_features is None:
                inputs = {"input_ids": input_ids, **extra}
            else:
                embeds = self.model.get_input_embeddings()(input_ids)
                projector = _unwrap_peft(self.model).get_submodule(architecture.projector)
                projected = projector(image_features).to(embeds.dtype)
                mask = (input_ids == architecture.image_token_id).unsqueeze(-1).expand_as(embeds)
                inputs = {"inputs_embeds": embeds.masked_scatter(mask, projected)}
            logits = self.model(**inputs, attention_mask=attention_mask, logits_to_keep=keep).logits
            if logits.dim() == 3:  # a model that ignores a boolean mask returns every position
                logits = logits[keep]
            return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])

    return LossForward()
