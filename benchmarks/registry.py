"""One registry of the optimizers that the benchmarks and the studies compare.

Each :class:`Method` says how to build its optimizer for a learning rate and a
parameter tree, which tree it is made for (``"lora"``: adapter factors found by
:func:`lora_muon_jax.find_lora_pairs`; ``"dense"``: full weight matrices), and in
which unit its rate is (``"spectral"``: a spectral-norm budget per step, like
Muon's; ``"adam"``: an Adam-like per-entry step). Everyone builds optimizers
through :func:`make`, so a method means the same thing in ``benchmarks.run`` and in
``benchmarks.study``::

    tx = registry.make("dense_muon", 0.02, params, adam_learning_rate=1e-2,
                       is_matrix=lambda path, leaf: leaf.ndim == 2)

Dense methods send the leaves ``is_matrix`` selects to their matrix rule and
every other leaf to AdamW at ``adam_learning_rate`` (no weight decay); LoRA
methods find their pairs themselves and send the other leaves to their own AdamW.
Names:

* ``lora_muon`` (and ``lora_muon_newton_schulz``, ``lora_muon_paper``: its
  accelerator solver and the paper's route), ``spectron``, ``riemannion``,
  ``lora_rite``, ``adamw_lora`` (AdamW on every leaf of a LoRA tree);
* ``dense_muon``: ``optax.contrib.scale_by_muon`` with β = 0.95, no Nesterov and
  **no shape factor**, so ``‖ΔW‖₂ ≈ η`` like LoRA-Muon's product step;
  ``dense_muon_optax``: stock ``optax.contrib.muon`` (Nesterov and its
  ``sqrt(max(1, fan_out/fan_in))`` factor) on the selected leaves only;
* ``lora_pre_muon``, ``lora_pre_adam``, ``limuon`` (rank-``rank`` momentum; LiMuon
  wants ``prev_grads``, see :attr:`Method.extra_args`), ``psgd_kron`` (needs
  ``psgdax``), ``dense_adamw``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import optax

Tree = Literal["lora", "dense"]
Rate = Literal["spectral", "adam"]
IsMatrix = Callable[[tuple[Any, ...], Any], bool]


class Setup(NamedTuple):
    """What a builder gets: the rates, the tree, the matrix selector and options."""

    learning_rate: optax.ScalarOrSchedule
    params: Any
    adam_learning_rate: optax.ScalarOrSchedule | None
    is_matrix: IsMatrix
    options: Mapping[str, Any]


class Method(NamedTuple):
    """One registered optimizer.

    Attributes:
      name: registry key.
      label: human-readable name for tables and plots.
      tree: ``"lora"`` or ``"dense"``: the parameter tree it is made for.
      rate: ``"spectral"`` or ``"adam"``: the unit of its learning rate.
      default_lr: a sensible rate for timing benchmarks (not a tuned optimum).
      build: ``Setup -> GradientTransformation``.
      extra_args: keyword arguments ``update`` wants besides the params
        (``("prev_grads",)`` for LiMuon's STORM term).
      requires: an optional package the method imports (``None``: always there).
    """

    name: str
    label: str
    tree: Tree
    rate: Rate
    default_lr: float
    build: Callable[[Setup], optax.GradientTransformation]
    extra_args: tuple[str, ...] = ()
    requires: str | None = None


def is_2d_or_more(path: tuple[Any, ...], leaf: Any) -> bool:
    """The default matrix selector: every leaf with at least two axes."""
    return len(getattr(leaf, "shape", ())) >= 2


def _adam(s: Setup) -> optax.GradientTransformation:
    lr = s.learning_rate if s.adam_learning_rate is None else s.adam_learning_rate
    return optax.adamw(lr, weight_decay=0.0)


def _on_matrices(
    s: Setup, matrix_rule: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``matrix_rule`` on the leaves ``s.is_matrix`` selects, AdamW on the rest."""
    labels = jax.tree_util.tree_map_with_path(
        lambda p, x: "matrix" if s.is_matrix(p, x) else "adam", s.params
    )
    return optax.partition({"matrix": matrix_rule, "adam": _adam(s)}, labels)


def _muon_dims(leaf: Any) -> Any:
    from optax.contrib import MuonDimensionNumbers

    # Leading axes are batch axes (stacked layers); the last two are the matrix.
    ndim = len(leaf.shape)
    return MuonDimensionNumbers(reduction_axis=ndim - 2, output_axis=ndim - 1)


# ----------------------------------------------------------------------------- builders


def _lora_muon(**preset: Any) -> Callable[[Setup], optax.GradientTransformation]:
    def build(s: Setup) -> optax.GradientTransformation:
        import lora_muon_jax as lmj

        return lmj.lora_muon(
            s.learning_rate, adam_learning_rate=s.adam_learning_rate, **{**preset, **s.options}
        )

    return build


def _peer(name: str) -> Callable[[Setup], optax.GradientTransformation]:
    def build(s: Setup) -> optax.GradientTransformation:
        from lora_muon_jax import peers

        return getattr(peers, name)(
            s.learning_rate, adam_learning_rate=s.adam_learning_rate, **s.options
        )

    return build


def _adamw_all(s: Setup) -> optax.GradientTransformation:
    return optax.adamw(s.learning_rate, **{"weight_decay": 0.0, **s.options})


def _dense_muon(s: Setup) -> optax.GradientTransformation:
    from optax.contrib import scale_by_muon

    opts = {"beta": 0.95, "nesterov": False, **s.options}
    dims = lambda u: jax.tree.map(_muon_dims, u)  # noqa: E731
    muon = optax.chain(
        scale_by_muon(weight_dimension_numbers=dims, **opts),
        optax.scale_by_learning_rate(s.learning_rate),
    )
    return _on_matrices(s, muon)


def _dense_muon_optax(s: Setup) -> optax.GradientTransformation:
    from optax.contrib import muon

    # Stock muon would also take embeddings and heads (every 2-D leaf): label explicitly.
    dims = jax.tree_util.tree_map_with_path(
        lambda p, x: _muon_dims(x) if s.is_matrix(p, x) else None, s.params
    )
    adam_lr = s.learning_rate if s.adam_learning_rate is None else s.adam_learning_rate
    return muon(
        s.learning_rate, adam_learning_rate=adam_lr, muon_weight_dimension_numbers=dims, **s.options
    )


def _dense_peer(name: str, **preset: Any) -> Callable[[Setup], optax.GradientTransformation]:
    def build(s: Setup) -> optax.GradientTransformation:
        from lora_muon_jax import peers

        rule = getattr(peers, name)(s.learning_rate, **{**preset, **s.options})
        return _on_matrices(s, rule)

    return build


def _psgd_kron(s: Setup) -> optax.GradientTransformation:
    import psgdax

    return _on_matrices(s, psgdax.kron(s.learning_rate, **{"b1": 0.9, **s.options}))


PEER_RANK = 8  # default momentum rank of LoRA-Pre and LiMuon

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora_muon", "LoRA-Muon", "lora", "spectral", 0.02, _lora_muon()),
        Method(
            "lora_muon_newton_schulz",
            "LoRA-Muon (Newton–Schulz solver)",
            "lora",
            "spectral",
            0.02,
            _lora_muon(solver="newton_schulz"),
        ),
        Method(
            "lora_muon_paper",
            "LoRA-Muon (paper route)",
            "lora",
            "spectral",
            0.02,
            _lora_muon(method="paper"),
        ),
        Method("spectron", "Spectron", "lora", "spectral", 0.02, _peer("spectron")),
        Method("riemannion", "Riemannion", "lora", "spectral", 0.02, _peer("riemannion")),
        Method("lora_rite", "LoRA-RITE", "lora", "adam", 1e-3, _peer("lora_rite")),
        Method("adamw_lora", "AdamW-LoRA", "lora", "adam", 1e-3, _adamw_all),
        Method("dense_adamw", "dense AdamW", "dense", "adam", 1e-3, _adamw_all),
        Method("dense_muon", "dense Muon", "dense", "spectral", 0.02, _dense_muon),
        Method(
            "dense_muon_optax",
            "dense Muon (stock optax)",
            "dense",
            "spectral",
            0.02,
            _dense_muon_optax,
        ),
        Method(
            "lora_pre_muon",
            "dense LoRA-Pre Muon",
            "dense",
            "spectral",
            0.02,
            _dense_peer("lora_pre_muon", rank=PEER_RANK, nesterov=False, shape_scaling="none"),
        ),
        Method(
            "lora_pre_adam",
            "dense LoRA-Pre Adam",
            "dense",
            "adam",
            1e-3,
            _dense_peer("lora_pre_adam", rank=PEER_RANK),
        ),
        Method(
            "limuon",
            "dense LiMuon",
            "dense",
            "spectral",
            0.02,
            _dense_peer("limuon", rank=PEER_RANK),
            extra_args=("prev_grads",),
        ),
        Method(
            "psgd_kron", "dense PSGD-Kron", "dense", "adam", 1e-3, _psgd_kron, requires="psgdax"
        ),
    )
}


def get(name: str) -> Method:
    """The registered method ``name``; a clear error listing the names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def available(name: str) -> bool:
    """Whether ``name``'s optional dependency (if any) can be imported."""
    req = get(name).requires
    if req is None:
        return True
    try:
        __import__(req)
    except ImportError:
        return False
    return True


def names(tree: Tree | None = None) -> tuple[str, ...]:
    """Registered names, optionally only those made for ``tree``."""
    return tuple(n for n, m in METHODS.items() if tree is None or m.tree == tree)


def make(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    params: Any,
    *,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    is_matrix: IsMatrix = is_2d_or_more,
    **options: Any,
) -> optax.GradientTransformation:
    """Builds method ``name`` for ``params``.

    Args:
      name: a key of :data:`METHODS`.
      learning_rate: the method's rate or schedule (may be traced).
      params: the tree it will train (dense methods label its leaves).
      adam_learning_rate: rate of the leaves the method's own rule does not take
        (``None``: the method's default, for dense methods ``learning_rate``).
      is_matrix: dense methods: ``(path, leaf) -> bool`` selecting the matrices.
      **options: passed to the underlying constructor (e.g. ``rebalance=`` for
        ``lora_muon``, ``rank=`` for LoRA-Pre and LiMuon), over the registry's presets.

    Returns:
      The optimizer.
    """
    method = get(name)
    return method.build(Setup(learning_rate, params, adam_learning_rate, is_matrix, options))
