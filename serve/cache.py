"""A bounded LRU of image features keyed by the SHA-256 of the uploaded bytes.

The same photo asked for <OD> now and <CAPTION> a second later runs the vision encoder once: on
base that is ~3 s of CPU saved per hit. Bounded by bytes, not entries, because a large model's
features are 1.3x a base model's.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from flonnx.runtime import ImageFeatures


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageFeatures | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, item: ImageFeatures) -> None:
        size = item.features.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.features.nbytes
            self._items[key] = item
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.features.nbytes

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
