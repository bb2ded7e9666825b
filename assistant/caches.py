"""Bounded, byte-accounted LRU caches that let later turns reuse earlier work.

``PrefixKVCache`` keeps the KV cache of finished generations, found again by the
longest common token prefix, so a conversation's next turn prefills only its new
tokens. ``ImageFeatureCache`` keeps vision tower + projector output per image.
``DecodedImageCache`` keeps images decoded to RGB, so an image in the history is
decoded once per process, not on every turn. All evict the least recently used
entries past their byte budget; a miss only means recomputing.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from assistant.messages import ImageAttachment


def tensor_bytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size())


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers ``Cache``: the memory behind every layer's keys and values, spare room past
    the cached tokens included (keys and values may be views of larger buffers), each buffer counted once."""
    buffers: dict[int, int] = {}
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "untyped_storage"):
                storage = tensor.untyped_storage()
                buffers[storage.data_ptr()] = storage.nbytes()
    return sum(buffers.values())


class ByteLRU:
    """An LRU map whose entries each declare their size; evicts oldest entries past ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def pop(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self._bytes -= entry[1]
            return entry[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size > self.budget:
                return  # larger than the whole budget: not worth keeping
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.budget:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self.evictions += 1

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def drop(self, doomed: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key ``doomed`` accepts (what a changed model made stale); returns how many."""
        with self._lock:
            keys = [key for key in self._entries if doomed(key)]
            for key in keys:
                self._bytes -= self._entries.pop(key)[1]
            return len(keys)


@dataclass
class PrefixHit:
    cache: Any  # a transformers Cache holding exactly ``length`` tokens
    length: int


class PrefixKVCache:
    """KV caches keyed by (adapter, token ids); a lookup uses the entry sharing the longest prefix.

    Generation extends a cache in place, so an entry that the new prompt
    almost entirely continues (a conversation's own previous turn) is moved out
    and stored again afterwards under the longer sequence; an entry that only
    shares a beginning (another channel with the same system prompt) is copied,
    so conversations do not steal each other's caches.
    """

    def __init__(self, budget_bytes: int) -> None:
        self._lru = ByteLRU(budget_bytes)
        self.hits = 0
        self.misses = 0

    @property
    def used_bytes(self) -> int:
        return self._lru.used_bytes

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    def __len__(self) -> int:
        return len(self._lru)

    def take(self, adapter: str | None, token_ids: tuple[int, ...]) -> PrefixHit | None:
        """The cache with the longest common prefix, cropped so at least one new token remains to prefill."""
        best_key: tuple[str | None, tuple[int, ...]] | None = None
        best_length = 0
        for key in self._lru.keys():
            assert isinstance(key, tuple)
            key_adapter, key_ids = key
            if key_adapter != adapter:
                continue
            length = _common_prefix(key_ids, token_ids)
            if length > best_length:
                best_key, best_length = (key_adapter, key_ids), length
        best_length = min(best_length, len(token_ids) - 1)
        if best_key is None or best_length <= 0:
            self.misses += 1
            return None
        continued = best_length * 10 >= len(best_key[1]) * 9
        cache = self._lru.pop(best_key) if continued else copy.deepcopy(self._lru.get(best_key))
        if cache is None:
            self.misses += 1
            return None
        cache.crop(best_length - cache.get_seq_length())
        self.hits += 1
        return PrefixHit(cache, best_length)

    def store(self, adapter: str | None, token_ids: tuple[int, ...], cache: Any) -> None:
        """Keep ``cache``, which holds the KV of exactly ``token_ids``."""
        self._lru.put((adapter, token_ids), cache, kv_cache_bytes(cache))

    def drop_adapter(self, adapter: str | None) -> int:
        """Forget the caches computed with ``adapter`` (it was unloaded; a new one may take its name)."""
        return self._lru.drop(lambda key: isinstance(key, tuple) and key[0] == adapter)

    def clear(self) -> None:
        self._lru.drop(lambda key: True)


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


class ImageFeatureCache:
    """Projected image features keyed by (image sha256, adapter); the model is fixed per backend."""

    def __init__(self, budget_bytes: int) -> None:
        self._lru = ByteLRU(budget_bytes)

    @property
    def used_bytes(self) -> int:
        return self._lru.used_bytes

    def get(self, sha256: str, adapter: str | None) -> Any | None:
        return self._lru.get((sha256, adapter))

    def put(self, sha256: str, adapter: str | None, features: Any) -> None:
        self._lru.put((sha256, adapter), features, tensor_bytes(features))

    def drop_adapter(self, adapter: str | None) -> int:
        """Forget the features computed with ``adapter`` (it was unloaded; a new one may take its name)."""
        return self._lru.drop(lambda key: isinstance(key, tuple) and key[1] == adapter)

    def clear(self) -> None:
        self._lru.drop(lambda key: True)


class DecodedImageCache:
    """RGB images keyed by the sha256 of their bytes; callers must not modify what they get."""

    def __init__(self, budget_bytes: int) -> None:
        self._lru = ByteLRU(budget_bytes)
        self.decodes = 0

    @property
    def used_bytes(self) -> int:
        return self._lru.used_bytes

    def get(self, image: ImageAttachment) -> Any:
        """The decoded image (a PIL image), decoding it only on a miss."""
        cached = self._lru.get(image.sha256)
        if cached is not None:
            return cached
        from assistant.vision import to_pil

        decoded = to_pil(image)
        self.decodes += 1
        self._lru.put(image.sha256, decoded, decoded.width * decoded.height * len(decoded.getbands()))
        return decoded
