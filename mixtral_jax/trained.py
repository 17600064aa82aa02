"""A training OUTPUT folder: its layout, its Orbax `CheckpointManager`, and where its latest weights lie.

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

from mixtral_jax import checkpoint
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
    """The CheckpointManager of `OUTPUT/checkpoints`, keeping the last `keep` steps.

    `read_only`: a manager to restore from, which creates and deletes nothing. Orbax's own `read_only` option
    logs warnings each time (that it resets the other options, that the folder is read-only), so a loader's
    manager is one that keeps every step and is never asked to save.
    """
    if read_only:
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=False, enable_async_checkpointing=False)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every)
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
    """The items of `step`, the arrays restored into the shapes, dtypes and shardings of the given trees; the
    progress holds the `data_position` to continue from. A damaged step is a CheckpointError naming it."""
    folder = _step_folder(mngr, step)
    for item in ("params", "opt_state"):
        checkpoint.stored_tree(folder / item)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)), progress=ocp.args.JsonRestore(),
        ))
    except Exception as e:
        raise checkpoint.unreadable(folder, e) from None
    progress = restored["progress"]
    position = progress.get("data_position") if isinstance(progress, dict) else None
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise CheckpointError(f"{folder}: unreadable checkpoint (its progress holds no data_position, "
                              "a non-negative integer)")
    return restored["params"], restored["opt_state"], progress


def latest_step_folder(output: str | os.PathLike) -> Path:
    """The folder of the latest saved step of a training OUTPUT, `OUTPUT/checkpoints/STEP`."""
    mngr = manager(output, read_only=True)
    try:
        step = mngr.latest_step()
    finally:
        mngr.close()
    if step is None:
        raise CheckpointError(f"{output}: the training run has no saved step yet")
    return _step_folder(mngr, step)


def _step_folder(mngr: ocp.CheckpointManager, step: int) -> Path:
    return Path(mngr.directory) / str(step)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
