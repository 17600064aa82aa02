"""lm-evaluation-harness tasks run on a model: the tasks checked before the model loads, each task's results kept
in OUTPUT/lm-eval.json as it finishes (a rerun skips the tasks already there unless asked), and lm-eval's
table of them. Needs the `eval` extra."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixtral_jax.errors import MixtralError
from mixtral_jax.evals import store

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from mixtral_jax.api import Mixtral
    from mixtral_jax.tokenizer import Tokenizer

# The parts of simple_evaluate's result that describe each task, and that its table is made from.
PARTS = ("results", "versions", "n-shot", "higher_is_better", "n-samples")


def task_manager(tasks: Sequence[str], include_path: str | None = None) -> TaskManager:
    """lm-eval's task index (with the tasks of `include_path`), once every task in `tasks` is known to it."""
    import logging

    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise MixtralError(f"--include-path {include_path}: not a folder")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if include_path is not None:  # indexing lm-eval's own thousands of tasks takes seconds: only when needed
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(manager.match_tasks([t]) for t in tasks):
            return manager
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if not tasks or unknown:
        raise MixtralError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown) or '(none)'}"
                           " (`lm-eval ls tasks` lists them; --include-path adds a folder of task YAML files)")
    return manager


def evaluate(model: Mixtral, tokenizer: Tokenizer, tasks: Sequence[str], manager: TaskManager, limit: int | None,
             num_fewshot: int | None, batch_size: int, output: str | os.PathLike,
             force: bool = False) -> tuple[dict, str]:
    """Each task not yet in OUTPUT/lm-eval.json (all with `force`) run by simple_evaluate and written there as it
    finishes -> the results (of these tasks and of any the file held before), and lm-eval's table of them."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    from mixtral_jax.evals.lm_eval_model import MixtralLM

    path = Path(output) / "lm-eval.json"
    results = store.read(path, dict(limit=limit, num_fewshot=num_fewshot), force)
    for part in PARTS:
        results.setdefault(part, {})
    lm = MixtralLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    for task in tasks:
        if task in results["results"]:
            continue
        found = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                log_samples=False, bootstrap_iters=0)
        for part in PARTS:
            results[part].update(_plain(found.get(part, {})))
        store.write(path, results)
    return results, make_table(results)


def _plain(value: Any) -> Any:
    """`value` as JSON holds it: numbers as floats or ints, NaN as None, anything else as its text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None
