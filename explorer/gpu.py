"""GPU placement on Hugging Face Spaces: on a ZeroGPU Space, functions that run the models must be
decorated with `spaces.GPU`; elsewhere (no `spaces` package) the decorator does nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

try:  # the `spaces` package exists on Spaces only
    import spaces  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    spaces = None


def gpu_task(fn: F) -> F:
    """`spaces.GPU(fn)` when the `spaces` package imports, else `fn` itself."""
    return spaces.GPU(fn) if spaces is not None else fn
