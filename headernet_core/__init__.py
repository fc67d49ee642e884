"""headernet_core: the reusable header-detection trainer (a library; the CLIs are thin).

Public API (imported lazily so that `import headernet_core.metrics` does not pull in torch):

    from headernet_core import TrainConfig, train, evaluate, predict, load_backbone
    result = train(TrainConfig(train_csv=..., val_csv=..., backbone="vmae"), on_epoch=callback)

`train`, `evaluate` and `predict` are functions. Their library code lives in `trainer.py`,
`evaluation.py` and `prediction.py`; the modules `train.py`, `evaluate.py` and `predict.py` are
only the `python -m` entry points and are never imported (a submodule named like a function
would replace the function on the package once imported).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "headernet_core.config",
    "HeaderNetError": "headernet_core.errors",
    "train": "headernet_core.trainer",
    "EpochReport": "headernet_core.trainer",
    "TrainResult": "headernet_core.trainer",
    "evaluate": "headernet_core.evaluation",
    "load_classifier": "headernet_core.evaluation",
    "predict": "headernet_core.prediction",
    "load_backbone": "headernet_core.backbones",
    "create_backbone": "headernet_core.backbones",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'headernet_core' has no attribute {name!r}")
