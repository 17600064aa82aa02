"""A training OUTPUT folder: its layout, its Orbax `CheckpointManager`, and loading its latest weights.

    OUTPUT/model_config.json   the ModelConfig the run trains (float32 parameters)
    OUTPUT/train_config.json   the settings a resumed run must repeat (batch, length, seed, optimizer)
    OUTPUT/tokenizer.model     the SentencePiece model of its data (when there is one)
    OUTPUT/metrics.jsonl       one JSON object per logged step
    OUTPUT/checkpoints/STEP/   `params` (the parameter tree as a nested dict), `opt_state` and `progress`
                               (JSON: `step`, `data_position`), written atomically by Orbax
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.errors import CheckpointError

MODEL_CONFIG = "model_config.json"
TRAIN_CONFIG = "train_config.json"
TOKENIZER = "tokenizer.model"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def is_training_output(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `mixtral-jax train`."""
    path = Path(path)
    return (path / MODEL_CONFIG).is_file() and (path / CHECKPOINTS).is_dir()


def manager(output: str | os.PathLike, keep: int = 3, save_every: int = 1,
            read_only: bool = False) -> ocp.CheckpointManager:
    """The CheckpointManager of `OUTPUT/checkpoints`, keeping the last `keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=not read_only, read_only=read_only
    )
    return ocp.CheckpointManager(Path(output).absolute() / CHECKPOINTS, options=options,
                                 item_names=("params", "opt_state", "progress"))


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, progress: dict[str, int],
         force: bool = False) -> None:
    """Save a step (when due under `save_every`, or `force`): parameters, optimizer state, data position."""
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        progress=ocp.args.JsonSave(progress),
    ), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any) -> tuple[Any, Any, dict[str, int]]:
    """The items of `step`, the arrays restored into the shapes, dtypes and shardings of the given trees."""
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params)), opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
        progress=ocp.args.JsonRestore(),
    ))
    return restored["params"], restored["opt_state"], restored["progress"]


def restore_trained_params(output: str | os.PathLike, abstract_state: nnx.State, shardings: nnx.State) -> nnx.State:
    """The parameters of the latest step in a training OUTPUT, placed with `shardings`.

    `abstract_state` gives the tree and dtypes (a dtype other than float32 casts on restore).
    """
    mngr = manager(output, read_only=True)
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"{output}: the training run has no saved step yet")
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings),
    )
    pure = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    mngr.close()
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, pure)
    return state


def load_trained(output: str | os.PathLike, dtype: str | None = None, mesh: jax.sharding.Mesh | str | None = None):
    """A `Mixtral` handle with the latest weights of a training OUTPUT (and its tokenizer)."""
    from mixtral_jax import api
    from mixtral_jax import sharding as sh

    output = Path(output)
    cfg = ModelConfig.load(output / MODEL_CONFIG).with_dtype(dtype)
    mesh = api.default_mesh(mesh)
    graphdef, abstract = api.abstract_model(cfg)
    params = restore_trained_params(output, abstract, sh.named_shardings(abstract, mesh))
    tokenizer = output / TOKENIZER
    return api.Mixtral(cfg, graphdef, params, api._tokenizer(tokenizer if tokenizer.is_file() else None), mesh)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
