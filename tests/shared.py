"""One result for the whole test run, whichever xdist worker asks first."""

import json
import os

from filelock import FileLock


def shared_result(tmp_path_factory, name: str, compute):
    """`compute()` (JSON-serialisable) computed once for the whole run and read by every xdist worker."""
    root = tmp_path_factory.getbasetemp().parent if "PYTEST_XDIST_WORKER" in os.environ else \
        tmp_path_factory.getbasetemp()
    path = root / f"{name}.json"
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())
