"""What identifies a set of clip shards: the schema version and the config values that shape
their contents, hashed into the manifest's ``config_hash``.

Kept apart from the row codec (``vistr.data.shards``, which needs torch and torchvision) so that
planning a preprocessing run or a Tune campaign, and ``--help``, import none of them.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vistr.config import Config

# Bump whenever a column of the shard rows (vistr.data.shards.COLUMNS) is added, removed, or
# changes meaning or encoding.
SCHEMA_VERSION = 1


def preprocess_settings(cfg: Config) -> dict[str, int | None]:
    """The config values that determine shard contents, and nothing else.

    Augmentation parameters are applied when shards are *read*, so changing them must not
    invalidate preprocessed data; changing T, the resolution or the stride must.
    """
    return {
        "num_frames": cfg.model.num_frames,
        "min_size": cfg.data.min_size,
        "max_size": cfg.data.max_size,
        "clip_stride": cfg.data.clip_stride,
    }


def settings_hash(settings: dict[str, Any]) -> str:
    """Stable hash of ``preprocess_settings`` (+ schema version): the manifest's ``config_hash``."""
    payload = json.dumps({"schema_version": SCHEMA_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
