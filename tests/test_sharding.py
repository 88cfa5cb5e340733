"""LoRA-Muon under sharding: same numbers, same state shardings, only r×r communication.

Runs on 8 host CPU devices (tests/conftest.py sets XLA_FLAGS). Factors are sharded
along m (a) and n (b), with both ``NamedSharding`` + jit (auto axes, GSPMD) and
explicit axes; the compiled HLO is inspected for collectives.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_muon_jax as lmj
from tests.helpers import ROUTES, assert_trees_rel_close

L, M, N, R = 2, 64, 48, 4
_COLLECTIVE = re.compile(
    r"=\s*(\([^=]*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")

LAYOUTS = {
    # mesh shape, axis names, spec of a (L, m, r), spec of b (L, r, n)
    "m_and_n_on_x": ((8,), ("x",), P(None, "x", None), P(None, None, "x")),
    "fsdp_m_tp_n": ((2, 4), ("x", "y"), P(None, "y", None), P(None, None, "y")),
    "layers_and_m": ((2, 4), ("x", "y"), P("x", "y", None), P("x", None, "y")),
}


def _collectives(hlo: str) -> list[tuple[str, list[int]]]:
    """(kind, element counts of each operand shape) for every collective in the HLO."""
    out = []
    # Tuples of 6+ operands carry `/*index=5*/` comments, whose `=` would hide the
    # collective from the pattern: drop comments first.
    hlo = re.sub(r"/\*.*?\*/", "", hlo)
    for shape_text, kind in _COLLECTIVE.findall(hlo):
        sizes = [
            math.prod(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(shape_text)
        ]
        out.append((kind, sizes))
    return out


def _problem():
    rng = np.random.default_rng(0)
    raw = {
        "lora_a": rng.standard_normal((L, M, R)),
        "lora_b": rng.standard_normal((L, R, N)),
        "bias": rng.standard_normal((N,)),
    }
    grads = {k: rng.standard_normal(v.shape) for k, v in raw.items()}
    return raw, grads


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("route", ["cholesky", "newton_schulz", "paper"])
def test_sharded_step_matches_and_communicates_only_rxr(layout, axis_type, route):
    shape, names, spec_a, spec_b = LAYOUTS[layout]
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
    specs = {"lora_a": spec_a, "lora_b": spec_b, "bias": P()}
    raw, raw_grads = _problem()
    tx = lmj.lora_muon(0.1, beta=0.9, weight_decay=0.1, **ROUTES[route])

    def put(tree):
        return {
            k: jax.device_put(jnp.asarray(v, jnp.float32), NamedSharding(mesh, specs[k]))
            for k, v in tree.items()
        }

    with jax.set_mesh(mesh):
        params, grads = put(raw), put(raw_grads)
        state = tx.init(params)
        step = jax.jit(tx.update)
        updates, new_state = step(grads, state, params)
        hlo = step.lower(grads, state, params).compile().as_text()
        # The state keeps the params' shardings, before and after an update.
        assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)
        assert jax.tree.map(jax.typeof, updates) == jax.tree.map(jax.typeof, params)
        mu = new_state.inner_states["lora_muon"].inner_state[0].mu
        assert jax.typeof(mu["lora_a"]) == jax.typeof(params["lora_a"])

    # Same numbers as on one device.
    single = {k: jnp.asarray(v, jnp.float32) for k, v in raw.items()}
    g1 = {k: jnp.asarray(v, jnp.float32) for k, v in raw_grads.items()}
    expected, _ = jax.jit(tx.update)(g1, tx.init(single), single)
    assert_trees_rel_close(jax.device_get(updates), expected)

    # Only r×r-sized (or smaller) data crosses devices, so no factor (L·m·r or
    # L·r·n floats) is ever gathered: Grams are all-reduced; with the layer axis
    # sharded, the tiny r×r stacks are also redistributed (all-gather / all-to-all
    # of at most L·r² floats) to batch their decompositions.
    colls = _collectives(hlo)
    largest = max((s for _, sizes in colls for s in sizes), default=0)
    assert largest <= L * R * R, (
        f"a collective moves {largest} > L·r² = {L * R * R} floats: {colls}"
    )
    if any(s is not None for s in spec_a):
        assert colls, "a sharded Gram must be all-reduced"


def test_collective_parser_sees_gathers():
    # Guard for the regex above: a replicated-output matmul of a sharded factor
    # without our out_sharding would be a gather; check the parser reports it.
    hlo = (
        "%ag = f32[2,64,4]{2,1,0} all-gather(%p), dimensions={1}\n"
        "%t = (f32[4,4], f32[2]) all-reduce(%x, %y)"
    )
    assert _collectives(hlo) == [("all-gather", [512]), ("all-reduce", [16, 2])]
