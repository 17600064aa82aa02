"""Run by tests as one of several processes: load a checkpoint folder onto a mesh spanning all processes
and print (one JSON line) the bytes this process read from it and the bytes of the whole model.

Usage: python -m tests.shard_reads_worker CHECKPOINT MESH COORDINATOR NUM_PROCESSES PROCESS_ID
"""

import json
import sys


def main(checkpoint: str, mesh: str, coordinator: str, num_processes: str, process_id: str) -> None:
    from mixtral_jax import distributed

    distributed.initialize(coordinator, int(num_processes), int(process_id), print_all=True)
    import jax

    import mixtral_jax
    from mixtral_jax.convert import mapping

    read = []
    assemble = mapping.assemble

    def counted(*args, **kwargs):
        out = assemble(*args, **kwargs)
        read.append(out.nbytes)
        return out

    mapping.assemble = counted
    model = mixtral_jax.load(checkpoint, mesh=mesh)
    print(json.dumps({"process": jax.process_index(), "read_bytes": sum(read),
                      "model_bytes": sum(x.nbytes for x in jax.tree.leaves(model.params))}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
