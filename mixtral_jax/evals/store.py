"""What the evaluations share: their results files (written atomically, read back so a rerun resumes) and the
optional packages they need (the `eval` extra)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mixtral_jax.errors import MixtralError
from mixtral_jax.outputs import check_parents, replace_atomically, writing

EXTRA = 'the `eval` extra: pip install "mixtral-jax[eval]" (or pip install -e ".[eval]" in a checkout)'
_MODULES = {"lm-eval": "lm_eval", "matplotlib": "matplotlib"}


def need(package: str) -> None:
    """Raise MixtralError naming the extra to install unless `package` (lm-eval, matplotlib) is importable."""
    if importlib.util.find_spec(_MODULES[package]) is None:
        raise MixtralError(f"{package} is not installed; it comes with {EXTRA}")


def read(path: Path, settings: dict, force: bool) -> dict:
    """The results in `path` written with these `settings` ({"settings", ...}), or fresh ones where there are
    none or `force`. Results written with other settings are refused: they would mix two experiments. In a
    multi-host job, process 0 reads them and every process gets its copy."""
    import jax

    if jax.process_count() == 1:
        return _read(path, settings, force)
    from mixtral_jax.distributed import broadcast_json

    return broadcast_json(_read(path, settings, force) if jax.process_index() == 0 else None)


def _read(path: Path, settings: dict, force: bool) -> dict:
    if force or not path.exists():
        return {"settings": settings}
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MixtralError(f"{path}: cannot read the earlier results ({e}); pass --force to replace them") from None
    if not isinstance(results, dict) or results.get("settings") != settings:
        raise MixtralError(f"{path}: holds results of other settings ({_differences(results, settings)}); "
                           "pass --force to replace them, or choose another --output")
    return results


def write(path: Path, results: dict) -> None:
    """`results` as `path`, whole or not at all (a stopped run leaves the previous version); by process 0 only."""
    import jax

    if jax.process_index() != 0:
        return
    check_parents(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n"))


def _differences(results: object, settings: dict) -> str:
    old = results.get("settings") if isinstance(results, dict) else None
    if not isinstance(old, dict):
        return "no settings recorded"
    keys = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in keys)
