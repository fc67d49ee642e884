"""headernet_core: the reusable header-detection trainer (a library; the CLIs are thin).

Public API (imported lazily so that `import headernet_core.metrics` does not pull in torch):

    from headernet_core import TrainConfig, train, evaluate, load_backbone
    result = train(TrainConfig(train_csv=..., val_csv=..., backbone="vmae"), on_epoch=callback)
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "headernet_core.config",
    "HeaderNetError": "headernet_core.errors",
    "train": "headernet_core.train",
    "EpochReport": "headernet_core.train",
    "TrainResult": "headernet_core.train",
    "evaluate": "headernet_core.evaluate",
    "load_classifier": "headernet_core.evaluate",
    "load_backbone": "headernet_core.backbones",
    "create_backbone": "headernet_core.backbones",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'headernet_core' has no attribute {name!r}")
