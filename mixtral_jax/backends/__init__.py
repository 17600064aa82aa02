"""How a model runs on each platform, behind one interface (`reference.Backend`), chosen once per handle.

- `reference.py`: plain XLA kernels, the checkpoint layout; the oracle, and what `plan` compiles.
- `cpu.py`: XLA:CPU's kernels and, on one device, the split layout of the weights.
- `gpu.py`: cuDNN's fused attention.
- `tpu.py`: megablox's grouped matmul for the experts.

`resolve` turns a platform (the mesh's devices), the model's config and the CPU's features into one of
them. The model never asks which it runs on: the compiled functions take the backend as a static argument
and hand it to the model, which calls its kernels.
"""

from __future__ import annotations

import jax

from mixtral_jax.backends.cpu import SPLIT_FROM_BYTES, CpuBackend, bf16_support, layer_bytes
from mixtral_jax.backends.gpu import GpuBackend
from mixtral_jax.backends.reference import Backend, Experts, LayerCache, Reader
from mixtral_jax.backends.tpu import TpuBackend
from mixtral_jax.config import ModelConfig
from mixtral_jax.errors import ConfigError

NAMES = ("reference", "cpu", "gpu", "tpu")
__all__ = ["NAMES", "Backend", "CpuBackend", "Experts", "GpuBackend", "LayerCache", "Reader", "TpuBackend",
           "resolve"]


def resolve(choice: str | Backend | None, cfg: ModelConfig, mesh: jax.sharding.Mesh, training: bool = False) -> Backend:
    """The backend a model of `cfg` runs with on `mesh`: `choice` itself if a Backend, else by name (None:
    the mesh's platform). On CPU the split layout is taken on one device once the layer weights outgrow the
    caches (smaller ones are copied cheaply, and unrolled layers compile longer), never for `training`
    (gradients and the optimizer work on the checkpoint layout)."""
    if isinstance(choice, Backend):
        return choice
    platform = mesh.devices.flat[0].platform
    name = choice or {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(platform,
                                                                                                "reference")
    if name == "cpu":
        split = not training and mesh.devices.size == 1 and layer_bytes(cfg) >= SPLIT_FROM_BYTES
        return CpuBackend(split=split, bf16=bf16_support())
    if name == "gpu":
        return GpuBackend(cudnn=platform != "cpu")
    if name == "tpu":
        return TpuBackend(interpret=platform != "tpu")
    if name == "reference":
        return Backend()
    raise ConfigError(f"unknown backend {name!r}; known: {', '.join(NAMES)}")
