"""Multi-host runs: join the processes of one job with `jax.distributed`, and keep their output apart.

Every process runs the same command; afterwards `jax.devices()` lists the devices of all hosts, a mesh
spans them, and each host reads and holds only its own devices' shards. Only process 0 writes to stdout
unless asked (`--print-all-processes`); errors still go to every process's stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

from mixtral_jax.errors import ConfigError

if TYPE_CHECKING:
    import jax

_TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")
DEFAULT_TIMEOUT = 300  # seconds to wait for the coordinator and the other processes (JAX's own default)


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags shared by every command that runs a model."""
    group = parser.add_argument_group("multi-host (every process runs the same command)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="address of process 0 (auto-detected on TPU VMs)")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    group.add_argument("--coordinator-timeout", type=int, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help=f"how long to wait for the coordinator and the other processes (default {DEFAULT_TIMEOUT})")
    group.add_argument("--print-all-processes", action="store_true",
                       help="every process prints its output (default: only process 0)")


def from_args(args: argparse.Namespace) -> None:
    """`initialize` from the flags of `add_distributed_args`."""
    initialize(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None), print_all=getattr(args, "print_all_processes", False),
               timeout=getattr(args, "coordinator_timeout", DEFAULT_TIMEOUT))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, print_all: bool = False, timeout: int = DEFAULT_TIMEOUT) -> None:
    """Join a multi-process job: with the given coordinator, process count and id; on a TPU VM with none
    given, as the TPU runtime describes the slice; otherwise (one process) do nothing. Call it before any
    other JAX call. Processes other than 0 then print nothing to stdout unless `print_all`.

    A process other than 0 first waits (saying so on stderr) up to `timeout` seconds for the coordinator to
    accept connections and fails with a ConfigError if it never does: JAX itself would end the process with
    a fatal error. Process 0 waits as long for the others to join (JAX ends it if they never do)."""
    import jax

    given = (coordinator_address, num_processes, process_id)
    if timeout < 1:
        raise ConfigError(f"--coordinator-timeout must be at least 1 second, got {timeout}")
    if any(v is not None for v in given):
        if None in given:
            raise ConfigError("multi-host needs all of --coordinator-address, --num-processes and --process-id")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if jax.distributed.is_initialized():
            return
        deadline = time.monotonic() + timeout
        if process_id != 0:
            _wait_for_coordinator(coordinator_address, deadline, f"process {process_id} of {num_processes}")
        elif num_processes > 1:
            _note(f"waiting up to {timeout} s for {num_processes - 1} more processes to join at {coordinator_address}")
        _initialize(jax, coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id, initialization_timeout=max(1, int(deadline - time.monotonic())))
    elif any(os.path.exists(p) for p in _TPU_DEVICE_FILES):
        _initialize(jax, initialization_timeout=timeout)
    if jax.process_index() != 0 and not print_all:
        sys.stdout = open(os.devnull, "w")


def _wait_for_coordinator(address: str, deadline: float, who: str) -> None:
    """Return once the coordinator at `address` (HOST:PORT) accepts a connection; ConfigError at `deadline`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--coordinator-address must be HOST:PORT, got {address!r}")
    host = host.strip("[]")
    waited = False
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"{who}: the coordinator at {address} did not answer within --coordinator-timeout "
                                  f"({e.strerror or e}); is process 0 running?") from None
        if not waited:
            _note(f"{who}: waiting for the coordinator at {address}")
            waited = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _note(message: str) -> None:
    print(f"mixtral-jax: {message}", file=sys.stderr, flush=True)


def _initialize(jax, **kwargs) -> None:
    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"could not join the multi-host job: {str(e).splitlines()[0]}") from None


def place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host value (the same on every process) as an array with `sharding`; each process places its own
    devices' shards."""
    import jax

    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def fetch(x: jax.Array) -> np.ndarray:
    """The whole value of an array on every process, also one sharded over several hosts."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def broadcast_json(value=None):
    """Process 0's `value` (anything JSON can hold; the other processes pass None) on every process. The
    bytes travel padded to a power of two, so a long-running loop compiles a handful of shapes."""
    import jax
    from jax.experimental import multihost_utils

    data = json.dumps(value).encode() if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = np.zeros(1 << max(size - 1, 0).bit_length(), np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size]))
