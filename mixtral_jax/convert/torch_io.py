"""PyTorch `.pth`/`.pt` files read memory-mapped, through torch's weights-only unpickler: no pickled code runs."""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np

from mixtral_jax.errors import CheckpointError


class TorchFile:
    """One `torch.save` file of named tensors; tensors stay on disk until read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{self.path}: reading PyTorch files needs torch (the `torch` extra: pip install -e \".[torch]\" "
                "from a checkout, or pip install torch)"
            ) from None
        try:
            state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = next((line for line in str(e).splitlines() if "GLOBAL" in line), "unsupported pickle")
            raise CheckpointError(
                f"{self.path}: refused, its pickle holds more than tensors and would run code ({reason.strip()})"
            ) from None
        except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors ... for damaged files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: unreadable PyTorch file ({first})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{self.path}: expected a flat dict of tensors")
        self._tensors = state

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return self._numpy(self._tensors[name].reshape(-1)[:0]).dtype

    def get(self, name: str) -> np.ndarray:
        """A zero-copy view of the memory-mapped tensor."""
        return self._numpy(self._tensors[name])

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """An in-memory copy of rows `rows` of a tensor; the mapped pages it touched are released."""
        view = self.get(name)
        view = view[rows] if view.ndim else view
        out = np.array(view)
        _release(view)
        return out

    @staticmethod
    def _numpy(t) -> np.ndarray:
        import torch

        t = t.detach()  # a saved nn.Parameter comes back requiring grad
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def _release(view: np.ndarray) -> None:
    """Drop the whole pages under a view of a read-only file mapping from this process's resident set.

    The file stays in the page cache; touching the view again reads it back. Without this, every page
    of a file torch keeps mapped would count toward resident memory until the file is closed.
    """
    if view.size == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    lo, hi = np.lib.array_utils.byte_bounds(view)
    start, end = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE, hi // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


_LIBC = ctypes.CDLL(None, use_errno=True)
