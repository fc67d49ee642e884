"""Checkpoint files: weights-only loadable, written atomically.

`best_epoch_<N>.pt` holds what is needed to use the model (weights, the resolved config, the
backbone architecture, epoch, metrics); `last.pt` adds what is needed to continue training
exactly (optimizer, scheduler, scaler, RNG states, metric history). Every value is a tensor or
a plain Python container/primitive, so `torch.load(..., weights_only=True)` accepts them.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from .artifacts import atomic_path
from .errors import fail

FORMAT = "headernet-v1"


class _Writer:
    """A file torch.save writes through: torch reports a failed write (disk full, quota) as
    an opaque RuntimeError; this keeps the OSError that caused it."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically and durably: `last.pt` is what a resume trusts, and a best checkpoint
    must be on disk before the previous one is deleted. A write error raises the OSError."""
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as fh:
        writer = _Writer(fh)
        try:
            torch.save({"format": FORMAT, **payload}, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints (never executing pickled code)."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        fail(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        fail(f"{path}: not a HeaderNet checkpoint (expected format {FORMAT!r} with a state_dict)")
    return payload


def rng_state() -> dict[str, Any]:
    """Global RNG streams the training loop consumes (dropout, init); numpy's global RNG is
    never used (sampling and augmentation draw from explicitly seeded generators)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
