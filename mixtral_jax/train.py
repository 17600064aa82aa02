"""Training and fine-tuning: next-token loss plus router losses, AdamW, a jitted step sharded on the mesh.

The loss is cross-entropy + `router_aux_loss_coef` * load-balancing loss + `router_z_loss_coef` * z-loss
(coefficients from the model config). The learning rate warms up linearly for `warmup_steps` and then
follows a cosine to `end_lr_ratio * lr` at `decay_steps`; the schedule does not depend on `steps`, so a run
continued to a larger `steps` takes exactly the updates of one started with it. Token ids below 0 in a
batch are right padding and count in no loss.

Legend: B batch, T length.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from mixtral_jax import api, data, losses, outputs, trained
from mixtral_jax import sharding as sh
from mixtral_jax.backends import Backend
from mixtral_jax.config import ModelConfig
from mixtral_jax.convert.sources import TOKENIZER_FILES
from mixtral_jax.errors import CheckpointError, ConfigError, TrainingDiverged
from mixtral_jax.layers import Mode
from mixtral_jax.model import Transformer
from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    seq_len: int
    lr: float = 3e-3
    warmup_steps: int = 10
    decay_steps: int = 10_000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    remat: bool = False
    log_every: int = 1
    save_every: int = 100
    keep: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "decay_steps", "log_every", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        for name in ("lr", "clip_norm"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite number above 0, got {getattr(self, name)}")
        for name in ("weight_decay", "end_lr_ratio"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite number of at least 0, got {getattr(self, name)}")


def schedule(tc: TrainConfig) -> optax.Schedule:
    """Learning rate by update count: linear warmup, then cosine decay to `end_lr_ratio * lr`."""
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.lr, tc.warmup_steps, max(tc.decay_steps, tc.warmup_steps + 1), tc.lr * tc.end_lr_ratio
    )


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (no decay on norm scales) on the warmup-cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(schedule(tc), b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=_decay_mask),
    )


def _decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def loss_fn(params: Any, graphdef: nnx.GraphDef, backend: Backend,
            batch: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its parts for a batch [B, T + 1] of token ids (inputs and shifted targets)."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    inputs, targets = batch[:, :-1], batch[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    out = model(jnp.maximum(inputs, 0), positions, Mode.TRAIN, backend)
    loss = losses.cross_entropy(out.logits, jnp.maximum(targets, 0), targets >= 0)
    parts = {"loss": loss}
    total = loss
    if out.router_logits is not None:
        parts["aux_loss"] = losses.load_balancing_loss(out.router_logits, cfg.top_k, inputs >= 0)
        total = total + cfg.router_aux_loss_coef * parts["aux_loss"]
        if cfg.router_z_loss_coef:
            parts["z_loss"] = losses.router_z_loss(out.router_logits, inputs >= 0)
            total = total + cfg.router_z_loss_coef * parts["z_loss"]
    parts["total_loss"] = total
    return total, parts


def train_step(graphdef: nnx.GraphDef, backend: Backend, tx: optax.GradientTransformation, params: Any,
               opt_state: Any, batch: jax.Array) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One update; where the loss, the gradient norm or the updated parameters are not finite, the state
    comes back unchanged and `parts["finite"]` is False, so no state a checkpoint could save is ever NaN."""
    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, backend, batch)
    parts["grad_norm"] = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = (jnp.isfinite(parts["total_loss"]) & jnp.isfinite(parts["grad_norm"])
              & jnp.isfinite(optax.global_norm(new_params)))
    parts["finite"] = finite

    def keep(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(finite, new, old)

    return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state), parts


def train(output: str | os.PathLike, data_files: Sequence[str | os.PathLike], tc: TrainConfig, *,
          config: ModelConfig | str | None = None, init: str | os.PathLike | None = None,
          tokenizer: str | os.PathLike | None = None, mesh: jax.sharding.Mesh | str | None = None,
          z_loss: float | None = None, progress: bool = True) -> list[dict[str, float]]:
    """Train a new model (`config`) or fine-tune a checkpoint (`init`) into OUTPUT; resume if it holds a run.

    `z_loss` sets the router z-loss coefficient (None: the config's). A step whose loss or gradient is not
    finite stops the run with a `TrainingDiverged` error; the checkpoints saved before it are kept. A run
    folder this call created is removed again if it fails before its first checkpoint.

    Returns the metrics logged by this call (also appended to OUTPUT/metrics.jsonl).
    """
    if (config is None) == (init is None):
        raise ConfigError("give exactly one of a model config and an initial checkpoint")
    if z_loss is not None and not 0 <= z_loss < math.inf:
        raise ConfigError(f"z_loss must be a finite number of at least 0, got {z_loss}")
    output = Path(output)
    _check_output(output)
    mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else sh.make_mesh(mesh)
    _check_batch(tc, mesh)
    if init is not None:
        model = api.load(init, dtype="float32", mesh=mesh, training=True)
        tokenizer = tokenizer or tokenizer_file(Path(init))
    else:
        cfg = api.resolve_config(config)
        _check_length(tc, cfg)  # before the initialisation compiles
        model = api.init_random(cfg, seed=tc.seed, dtype="float32", mesh=mesh, training=True)
        tokenizer = tokenizer or default_tokenizer_path()
    cfg = model.config if z_loss is None else model.config.replace(router_z_loss_coef=z_loss)
    _check_length(tc, cfg)
    if tokenizer is None:
        raise ConfigError(f"{init}: no tokenizer in the checkpoint folder; pass --tokenizer")
    tok = Tokenizer(tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
    tokens = data.tokenize_files(data_files, tok)
    batches = data.Batches(tokens, tc.batch_size, tc.seq_len, tc.seed)
    created = not output.exists()
    try:
        with outputs.writing(output):
            return _run(output, cfg, tc, model, tokens, batches, Path(tokenizer), mesh, progress)
    except BaseException:
        if created and not _checkpoint_entries(output):
            # Nothing of this run is worth keeping. A folder where Orbax began a save is left alone: its
            # writer threads may outlive the manager's close, and removing files under them can abort the
            # process; a rerun resumes from, or cleans up, what they leave.
            shutil.rmtree(output, ignore_errors=True)
        raise


def _run(output: Path, cfg: ModelConfig, tc: TrainConfig, model: api.Mixtral, tokens: np.ndarray,
         batches: data.Batches, tokenizer: Path, mesh: jax.sharding.Mesh, progress: bool) -> list[dict[str, float]]:
    """The training loop of `train`, in its OUTPUT folder."""
    output.mkdir(parents=True, exist_ok=True)
    outputs.mark(output, "training")
    mngr = trained.manager(output, keep=tc.keep, save_every=tc.save_every)
    try:
        start = mngr.latest_step() or 0
        fresh = start == 0  # a run with no checkpoint yet takes the settings of this call
        _write_or_check(output / trained.MODEL_CONFIG, cfg.to_dict(), "a different model", fresh)
        _write_or_check(output / trained.TRAIN_CONFIG, {**_resume_fields(tc), **_fingerprint(tokens)},
                        "other training settings or data", fresh)
        if fresh or not (output / trained.TOKENIZER).is_file():
            _atomic_copy(tokenizer, output / trained.TOKENIZER)
        if start > tc.steps:
            raise ConfigError(f"{output} is already at step {start}, past --steps {tc.steps}")
        if start == tc.steps:
            return []
        return _loop(output, cfg, tc, model, batches, mesh, mngr, start, progress)
    finally:
        mngr.close()


def _loop(output: Path, cfg: ModelConfig, tc: TrainConfig, model: api.Mixtral, batches: data.Batches,
          mesh: jax.sharding.Mesh, mngr, start: int, progress: bool) -> list[dict[str, float]]:
    tx, lr = optimizer(tc), schedule(tc)
    params = nnx.to_pure_dict(model.params)  # the checkpoint layout: a handle loaded for training holds it
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    with sh.rules_context(mesh):
        opt_state = jax.jit(tx.init)(params)
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    if start:
        params, opt_state, restored = trained.restore(mngr, start, params, opt_state)
        position = restored["data_position"]
    else:
        position = 0
    _truncate_metrics(output / trained.METRICS, start)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), remat=tc.remat)))
    with sh.rules_context(mesh):
        batch_sharding = jax.NamedSharding(mesh, sh.logical_spec((sh.BATCH, sh.LENGTH)))
    step_fn = jax.jit(
        functools.partial(train_step, graphdef, model.backend, tx),
        in_shardings=(param_shardings, opt_shardings, batch_sharding),
        out_shardings=(param_shardings, opt_shardings, None),
        donate_argnums=(0, 1),
    )
    logged: list[dict[str, float]] = []
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    tick, tokens = time.perf_counter(), 0
    try:
        with sh.rules_context(mesh), open(output / trained.METRICS, "a") as metrics_file:
            for step in range(start + 1, tc.steps + 1):
                batch = jax.device_put(batches.batch(position), batch_sharding)
                params, opt_state, parts = step_fn(params, opt_state, batch)
                if not bool(parts.pop("finite")):  # the state is the last step's: nothing of this one is saved
                    saved = mngr.latest_step()
                    raise TrainingDiverged(
                        f"step {step}: loss {float(parts['loss']):.4g}, gradient norm {float(parts['grad_norm']):.4g}: "
                        "training diverged and stopped; "
                        + (f"the last checkpoint, step {saved}, is kept" if saved else "no checkpoint was saved")
                        + " (a lower --lr or more --warmup-steps may help, in a new --output)")
                position += 1
                tokens += tc.batch_size * tc.seq_len
                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.perf_counter()
                    record = {"step": step, **{k: float(v) for k, v in parts.items()},
                              "lr": float(lr(step - 1)), "tokens_per_s": tokens / (now - tick)}
                    tick, tokens = now, 0
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    logged.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", aux=f"{record.get('aux_loss', 0.0):.3f}")
                bar.update(1)
                trained.save(mngr, step, params, opt_state, {"step": step, "data_position": position},
                             force=step == tc.steps)
    finally:
        bar.close()
        mngr.wait_until_finished()
    return logged


def evaluate(model: api.Mixtral, tokens: np.ndarray, seq_len: int, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over the consecutive windows of a token stream (each predicts seq_len)."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ConfigError(f"evaluation needs more than {seq_len} tokens, got {len(tokens)}")
    windows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    pad = -n % batch_size
    windows = np.concatenate([windows, np.full((pad, seq_len + 1), -1, np.int32)])
    total = 0.0
    with model.context():
        for i in range(0, len(windows), batch_size):
            batch = jnp.asarray(windows[i : i + batch_size])
            loss = _eval_loss(model.graphdef, model.backend, model.params, batch)
            total += float(loss) * float(jnp.sum(batch[:, 1:] >= 0))
    return total / (n * seq_len)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_loss(graphdef: nnx.GraphDef, backend: Backend, params: Any, batch: jax.Array) -> jax.Array:
    return loss_fn(params, graphdef, backend, batch)[1]["loss"]


def _check_output(output: Path) -> None:
    """Refuse an OUTPUT that exists and is neither an empty folder nor a training run, or cannot be made."""
    outputs.check_parents(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir()) and outputs.kind_of(output) != "training"):
        raise ConfigError(f"{output}: exists and holds no training run; choose a new or empty output folder")


def _check_batch(tc: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.batch_size % shards:
        raise ConfigError(f"batch size {tc.batch_size} is not divisible by data x fsdp = {shards}")


def _check_length(tc: TrainConfig, cfg: ModelConfig) -> None:
    if tc.seq_len > cfg.max_seq_len:
        raise ConfigError(f"sequence length {tc.seq_len} exceeds the model's context of {cfg.max_seq_len} tokens")


def _checkpoint_entries(output: Path) -> list[Path]:
    """What Orbax has begun writing in a run folder: saved steps and saves in progress."""
    folder = output / trained.CHECKPOINTS
    return list(folder.iterdir()) if folder.is_dir() else []


def tokenizer_file(folder: Path) -> Path | None:
    """The SentencePiece model stored in a checkpoint or training folder, if any."""
    for name in (trained.TOKENIZER, *TOKENIZER_FILES):
        if (folder / name).is_file():
            return folder / name
    return None


def _resume_fields(tc: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (all but length and bookkeeping)."""
    fields = dataclasses.asdict(tc)
    for name in ("steps", "remat", "log_every", "save_every", "keep"):
        del fields[name]
    return fields


def _fingerprint(tokens: np.ndarray) -> dict[str, Any]:
    """What identifies the training data: its token count and a hash of the token stream."""
    return {"data_tokens": len(tokens), "data_sha256": hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest()}


def _write_or_check(path: Path, record: dict[str, Any], what: str, replace: bool) -> None:
    """Write `record` as JSON (when `replace`, or no run wrote the file yet), or check that the file a
    previous run wrote holds the same."""
    if path.is_file() and not replace:
        stored = _read_json(path)
        if stored != record:
            changed = sorted(k for k in record.keys() | stored.keys() if stored.get(k) != record.get(k))
            raise ConfigError(f"{path.parent} holds a run with {what} ({', '.join(changed)}); "
                              "choose another output folder")
        return
    outputs.replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        stored = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(stored).__name__}")
    return stored


def _atomic_copy(src: Path, dst: Path) -> None:
    outputs.replace_atomically(dst, lambda tmp: shutil.copyfile(src, tmp))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the restored step (logged after the last checkpoint of an interrupted run), and a
    last line a killed run left half-written."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record_step = json.loads(line)["step"]
            if not isinstance(record_step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break
            raise CheckpointError(f"{path}: line {number} is not a metrics record with an integer 'step'") from None
        if record_step <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
