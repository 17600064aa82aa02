"""Start-up routing: the steering weights send each anchor token to its experts in every layer, the CPU's warm
routes run every loop of its grouped kernel and every branch of its per-choice switches, and a server warmed
with them serves as before."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import config, moe
from mixtral_jax.backends import Backend, CpuBackend, cpu
from mixtral_jax.engine import Engine
from mixtral_jax.layers import Mode
from mixtral_jax.steering import steer

STEERED = ("layers.attn_norm.scale", "layers.ffn_norm.scale", "layers.ffn.router")


@pytest.mark.parametrize("backend", ["reference", "stacked", "split"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_anchor_tokens_go_to_their_experts_in_every_layer(backend, dtype):
    model = mixtral_jax.init_random("tiny", seed=1, dtype=dtype)
    model = model.with_backend({"reference": Backend(), "stacked": CpuBackend(split=False),
                                "split": CpuBackend(split=True)}[backend])
    steering = steer(model)
    assert steering is not None
    route = np.array(list(steering.anchors))[np.random.default_rng(0).permutation(len(steering.anchors))]  # [56, 2]
    tokens = jnp.asarray(steering.tokens(route)[None])
    out = steering.model.module(tokens, jnp.arange(tokens.shape[1])[None], Mode.TRAIN, model.backend)
    logits = np.asarray(out.router_logits)[:, 0]  # [L, T, E]
    assert (np.argsort(-logits, axis=-1, kind="stable")[..., :2] == route).all()  # both choices, in order
    mine, theirs = model.leaves(), steering.model.leaves()
    shared = [(a, b) for path in mine if path not in STEERED for a, b in zip(jax.tree.leaves(mine[path]),
                                                                            jax.tree.leaves(theirs[path]))]
    assert shared and all(a is b for a, b in shared)  # no copies


def test_a_dense_model_is_not_steered():
    dense = mixtral_jax.init_random(config.preset("tiny").replace(n_experts=0, top_k=0), dtype="float32")
    assert steer(dense) is None
    assert moe.warm_routes(dense.backend, dense.config, 16, 16) == []


@pytest.mark.parametrize("n_tokens, valid", [(1, 1), (8, 8), (16, 16), (32, 32), (256, 256), (512, 508), (64, 5)])
def test_the_warm_routes_run_every_loop_of_the_grouped_kernel(n_tokens, valid):
    sizes = cpu.block_sizes(2 * n_tokens, 8)
    ran = set()
    for route in CpuBackend(split=True).warm_routes(n_tokens, valid, 2, 8, grouped=True):
        assert route.shape == (valid, 2) and (route[:, 0] != route[:, 1]).all()
        groups = np.bincount(route.ravel(), minlength=8)
        ran |= {(e, block) for e in range(8) for block, _, count in cpu.block_runs(int(groups[e]), sizes) if count}
    runnable = {block for group in range(valid + 1) for block, _, count in cpu.block_runs(group, sizes) if count}
    assert ran == {(e, block) for e in range(8) for block in runnable}


def test_the_warm_routes_take_every_branch_of_the_per_choice_switches():
    routes = CpuBackend(split=True).warm_routes(3, 3, 2, 8, grouped=False)
    taken = {(t, j, int(e)) for route in routes for (t, j), e in np.ndenumerate(route)}
    assert taken == {(t, j, e) for t in range(3) for j in range(2) for e in range(8)}
    assert all((route[:, 0] != route[:, 1]).all() for route in routes)
    assert CpuBackend(split=False).warm_routes(3, 3, 2, 8, grouped=False) == []  # a gather: no branches
    assert Backend().warm_routes(64, 64, 2, 8, grouped=True) == []


def test_a_warmed_engine_serves_what_generate_gives():
    """compile_all prefills and decodes under the steering weights; the requests after it run the model's
    own, in the programs it compiled."""
    model = mixtral_jax.init_random("tiny", seed=0, dtype="float32").with_backend(CpuBackend(split=True))
    engine = Engine(model, slots=2, max_len=48, steps=3, chunk=16)
    engine.compile_all()
    assert not engine.busy and engine.model is model
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 1000, n).tolist() for n in (30, 7)]
    for prompt in prompts:
        engine.admit(prompt, 6, stop_at_eos=False)
    got = [[] for _ in prompts]
    for slot, first in engine.prefill(budget=64):
        got[slot].append(int(first.ids[0]))
    while engine.busy:
        new = engine.step().ids
        for slot in range(2):
            got[slot] += [int(t) for t in new[:, slot] if t >= 0]
        engine.finished()
    assert got == model.generate(prompts, 6, stop_at_eos=False)


def test_kernels_without_branches_are_not_steered(monkeypatch):
    """The reference kernels (as GPU and TPU ones) have no branches to warm: compile_all runs each program once,
    without building steering weights."""
    from mixtral_jax import engine as engine_module

    def refuse(model):
        raise AssertionError("steering weights were built")

    monkeypatch.setattr(engine_module, "steer", refuse)
    model = mixtral_jax.init_random("tiny", seed=0, dtype="float32").with_backend(Backend())
    engine = Engine(model, slots=2, max_len=20, steps=2, chunk=8)
    assert engine.compile_all() == 2  # the smallest bucket and the longer prompt: 16 tokens, in chunks of 8
    assert not engine.busy
