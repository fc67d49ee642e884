"""What every backbone shares: the trainer-facing interface and the strict checkpoint copy.

The trainer only talks to `Backbone`: `forward` gives one pooled vector per clip, `block_list`
and `post_block_modules` say what "partial" fine-tuning unfreezes, and
`set_grad_checkpointing` trades compute for memory. Loading is the same for both families:
read the file safely, compare every name and shape with the model, fail with one line naming
the file and the first offending keys, then copy.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import fail

SHOW_KEYS = 5  # how many offending keys an error message lists before "... (N in all)"


class Backbone(nn.Module):
    """A video encoder: float (B, 3, T, H, W) -> (B, num_features)."""

    num_features: int

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False

    def block_list(self) -> list[nn.Module]:
        """The units "partial" fine-tuning unfreezes from the end, in forward order."""
        raise NotImplementedError

    def post_block_modules(self) -> list[nn.Module]:
        """Modules after the last block that train together with the unfrozen blocks."""
        return []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """timm convention: parameter names excluded from weight decay (1-D ones already are)."""
        return set()

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one block, through non-reentrant checkpointing when it is on and would matter.

        Non-reentrant, because the reentrant variant gives no gradients to a block whose input
        does not require grad (frozen stem), which silently trained only the head upstream.
        """
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _keep_buffers(block)))
        return block(x)


@contextlib.contextmanager
def _keep_buffers(module: nn.Module) -> Iterator[None]:
    """Undo buffer updates made while a checkpointed block is recomputed in backward.

    BatchNorm updates its running statistics on every train-mode forward; without this the
    recomputation would count each batch twice.
    """
    saved = [(buf, buf.detach().clone()) for buf in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


# --- reading files --------------------------------------------------------------------------
def torch_load_dict(path: Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)` a file that must hold a dict; errors name the file.

    `argparse.Namespace` is allow-listed because training scripts (OpenGVLab's included) save
    their `args` beside the weights; it carries plain values and runs no code.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and I/O errors all mean "not a usable file"
        reason = " ".join(str(exc).split())[:300]
        fail(f"{path}: cannot read it with torch.load(weights_only=True): {reason}. "
             f"Expected a PyTorch checkpoint holding only tensors and plain values")
    if not isinstance(data, dict):
        fail(f"{path}: expected a dict of tensors (a state dict), got {type(data).__name__}")
    return data


def unwrap_state_dict(data: Mapping[str, Any], path: Path, containers: tuple[str, ...]) -> dict[str, Any]:
    """The state dict inside a checkpoint: the first `containers` entry holding a dict, or the
    file's dict itself when all its values are tensors."""
    for key in containers:
        if isinstance(data.get(key), Mapping):
            data = data[key]
            break
    else:
        if not all(isinstance(v, torch.Tensor) for v in data.values()):
            fail(f"{path}: no state dict found; expected a flat dict of tensors or one under "
                 f"{' / '.join(repr(c) for c in containers)}, got keys {_first(sorted(map(str, data)))}")
    bad = [str(k) for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if bad:
        fail(f"{path}: state dict entries that are not tensors: {_first(bad)}")
    return dict(data)


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (`module.`, `backbone.`, ...) from the start of every key,
    repeatedly, so `module.backbone.x` becomes `x`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        while prefix := next((p for p in prefixes if key.startswith(p)), None):
            key = key[len(prefix):]
        out[key] = value
    return out


# --- strict copy ------------------------------------------------------------------------------
def _first(items: list[str]) -> str:
    shown = ", ".join(items[:SHOW_KEYS])
    return shown + (f", ... ({len(items)} in all)" if len(items) > SHOW_KEYS else "")


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                     hint: str = "") -> None:
    """Fail unless `state` has exactly the model's names with the model's shapes.

    Works on meta tensors too, so key lists can be checked without allocating weights.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (model expects {expected[k]})"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{len(keys)} {what}: {_first(keys)}" for what, keys in (
        ("missing key(s)", missing), ("unexpected key(s)", unexpected), ("mis-shaped tensor(s)", wrong)) if keys]
    if problems:
        fail(f"{source}: checkpoint does not fit the model: {'; '.join(problems)}"
             + (f". {hint}" if hint else ""))


def load_into(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], source: str,
              hint: str = "") -> nn.Module:
    """Build the model without allocating random weights (meta device), check `state`
    strictly, and adopt the checkpoint tensors as float32 parameters."""
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state, source, hint)
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a tensor the model holds outside its state dict; a bug here, not the user's
        raise RuntimeError(f"{source}: tensors left unloaded: {leftover[:SHOW_KEYS]}")
    return model.eval()


def require_path(path: str | os.PathLike[str], what: str) -> Path:
    """The path as `Path`, or a one-line error when it does not exist."""
    path = Path(path).expanduser()
    if not path.exists():
        fail(f"{path}: not found; expected {what}")
    return path
