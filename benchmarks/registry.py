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

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
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
    method: Method | None = None  # the catalogue entry being built


class Doc(NamedTuple):
    """A row of the peers table of ``docs/peer_optimizers.md`` (see :func:`peers_table`)."""

    title: str
    call: str
    state: str  # optimizer-state floats per m×n matrix
    gauge: str  # gauge invariant?
    needs: str  # what it needs from the training loop


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
      factory: dotted path of the constructor (``"lora_muon_jax.peers.spectron"``);
        :attr:`ships` says whether it is in ``lora_muon_jax``.
      variant: keyword arguments of ``factory`` that make this entry (e.g.
        ``solver="newton_schulz"``); the contract tests run them too.
      rank: the momentum rank the builder passes (:data:`PEER_RANK`), ``None``: the
        method has no rank argument. A table that uses another rank passes
        ``rank=`` to :func:`make` and says so.
      source: the paper (or library) it comes from, a URL.
      state_dtype_fields: the state attributes its ``mu_dtype`` (or
        ``state_dtype``) sets, as documented (shipped methods).
      static_args: arguments ``optax.inject_hyperparams`` must keep static.
      lapack_on_cpu: its CPU step calls LAPACK (``tests/test_lapack_hangs.py``
        checks both ways).
      unpaired_to_adamw: leaves its own rule does not take go to AdamW.
      doc: its row of the peers table (``None``: not in the table).
    """

    name: str
    label: str
    tree: Tree
    rate: Rate
    default_lr: float
    build: Callable[[Setup], optax.GradientTransformation]
    extra_args: tuple[str, ...] = ()
    requires: str | None = None
    factory: str = ""
    variant: Mapping[str, Any] = MappingProxyType({})
    rank: int | None = None
    source: str | None = None
    state_dtype_fields: tuple[str, ...] = ()
    static_args: tuple[str, ...] = ()
    lapack_on_cpu: bool = False
    unpaired_to_adamw: bool = True
    doc: Doc | None = None

    @property
    def ships(self) -> bool:
        """Whether the optimizer is one of ``lora_muon_jax``'s."""
        return self.factory.startswith("lora_muon_jax.")


def load_factory(method: Method) -> Callable[..., Any]:
    """The constructor :attr:`Method.factory` names (imported now)."""
    module, _, attr = method.factory.rpartition(".")
    return getattr(importlib.import_module(module), attr)


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


def _ours(s: Setup) -> optax.GradientTransformation:
    """A LoRA method of the package: its factory with its variant, over the options."""
    m = s.method
    return load_factory(m)(
        s.learning_rate, adam_learning_rate=s.adam_learning_rate, **{**m.variant, **s.options}
    )


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


def _dense_peer(**preset: Any) -> Callable[[Setup], optax.GradientTransformation]:
    """A dense-matrix peer of the package at its rank, with the benchmarks' ``preset``."""

    def build(s: Setup) -> optax.GradientTransformation:
        m = s.method
        rank = {} if m.rank is None else {"rank": m.rank}
        rule = load_factory(m)(s.learning_rate, **{**rank, **m.variant, **preset, **s.options})
        return _on_matrices(s, rule)

    return build


def _psgd_kron(s: Setup) -> optax.GradientTransformation:
    import psgdax

    return _on_matrices(s, psgdax.kron(s.learning_rate, **{"b1": 0.9, **s.options}))


PEER_RANK = 8  # the one momentum rank of LoRA-Pre and LiMuon (the study's; see Method.rank)

_ARXIV = "https://arxiv.org/abs/"
_OPTAX = "https://github.com/google-deepmind/optax"
_LORA_MUON = dict(
    factory="lora_muon_jax.lora_muon",
    source=_ARXIV + "2606.12921",
    state_dtype_fields=("mu",),
    lapack_on_cpu=True,
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "lora_muon",
            "LoRA-Muon",
            "lora",
            "spectral",
            0.02,
            _ours,
            **_LORA_MUON,
            doc=Doc(
                "LoRA-Muon",
                "`lora_muon(lr)`",
                "`(m+n)r` (one momentum per factor)",
                "yes",
                "`params`",
            ),
        ),
        Method(
            "lora_muon_newton_schulz",
            "LoRA-Muon (Newton–Schulz solver)",
            "lora",
            "spectral",
            0.02,
            _ours,
            **_LORA_MUON,
            variant=MappingProxyType({"solver": "newton_schulz"}),
        ),
        Method(
            "lora_muon_paper",
            "LoRA-Muon (paper route)",
            "lora",
            "spectral",
            0.02,
            _ours,
            **{**_LORA_MUON, "lapack_on_cpu": False},
            variant=MappingProxyType({"method": "paper"}),
        ),
        Method(
            "spectron",
            "Spectron",
            "lora",
            "spectral",
            0.02,
            _ours,
            factory="lora_muon_jax.peers.spectron",
            source=_ARXIV + "2602.12429",
            state_dtype_fields=("mu",),
            static_args=("ns_steps", "power_iterations"),
            doc=Doc(
                "Spectron",
                "`peers.spectron(lr)`",
                "`(m+n)r + 2r` (momentum, power-iteration vectors)",
                "**no** (a ×9 rescale changes the product step by ~100%)",
                "`params`",
            ),
        ),
        Method(
            "lora_rite",
            "LoRA-RITE",
            "lora",
            "adam",
            1e-3,
            _ours,
            factory="lora_muon_jax.peers.lora_rite",
            source=_ARXIV + "2410.20625",
            state_dtype_fields=("mu",),
            lapack_on_cpu=True,
            doc=Doc("LoRA-RITE", "`peers.lora_rite(lr)`", "`2(m+n)r + 2r² + 2`", "yes", "`params`"),
        ),
        Method(
            "riemannion",
            "Riemannion",
            "lora",
            "spectral",
            0.02,
            _ours,
            factory="lora_muon_jax.peers.riemannion",
            source=_ARXIV + "2507.12142",
            state_dtype_fields=("mu",),
            lapack_on_cpu=True,
            doc=Doc(
                "Riemannion",
                "`peers.riemannion(lr)`",
                "`(m+n)r`",
                "yes",
                "`params`; optional `riemannion_loi_init(grad_fn, params, key, alpha=...)`",
            ),
        ),
        Method("adamw_lora", "AdamW-LoRA", "lora", "adam", 1e-3, _adamw_all, factory="optax.adamw"),
        Method(
            "lora_pre_adam",
            "dense LoRA-Pre Adam",
            "dense",
            "adam",
            1e-3,
            _dense_peer(),
            factory="lora_muon_jax.peers.lora_pre_adam",
            rank=PEER_RANK,
            source=_ARXIV + "2602.24283",
            state_dtype_fields=("m_b", "m_a", "v_b", "v_a"),
            static_args=("rank",),
            lapack_on_cpu=True,
            doc=Doc(
                "LoRA-Pre (Adam)",
                "`peers.lora_pre_adam(lr, rank=r)`",
                "`2(m+n)r`",
                "n/a",
                "`params` for weight decay",
            ),
        ),
        Method(
            "lora_pre_muon",
            "dense LoRA-Pre Muon",
            "dense",
            "spectral",
            0.02,
            # Like dense_muon: no Nesterov, no shape factor (‖ΔW‖₂ ≈ η).
            _dense_peer(nesterov=False, shape_scaling="none"),
            factory="lora_muon_jax.peers.lora_pre_muon",
            rank=PEER_RANK,
            source=_ARXIV + "2602.24283",
            state_dtype_fields=("m_b", "m_a"),
            static_args=("rank", "ns_steps"),
            lapack_on_cpu=True,
            doc=Doc(
                "LoRA-Pre (Muon)",
                "`peers.lora_pre_muon(lr, rank=r)`",
                "`(m+n)r`",
                "n/a",
                "`params` for weight decay",
            ),
        ),
        Method(
            "limuon",
            "dense LiMuon",
            "dense",
            "spectral",
            0.02,
            _dense_peer(),
            extra_args=("prev_grads",),
            factory="lora_muon_jax.peers.limuon",
            rank=PEER_RANK,
            source=_ARXIV + "2509.14562",
            state_dtype_fields=("mu",),
            static_args=("rank", "oversampling", "ns_steps"),
            lapack_on_cpu=True,
            doc=Doc(
                "LiMuon #1 / #2",
                "`peers.limuon(lr)` / `peers.limuon(lr, rank=r̂)`",
                "`mn` / `(m+n)r̂ + r̂`",
                "n/a",
                "`prev_grads=` (the batch's gradient at the previous params; "
                "`examples/limuon_flax.py`)",
            ),
        ),
        Method(
            "dense_muon_optax",
            "dense Muon (stock optax)",
            "dense",
            "spectral",
            0.02,
            _dense_muon_optax,
            factory="optax.contrib.muon",
            source=_OPTAX,
            doc=Doc("Muon", "`optax.contrib.muon`", "`mn`", "n/a", "—"),
        ),
        Method(
            "dense_adamw",
            "dense AdamW",
            "dense",
            "adam",
            1e-3,
            _adamw_all,
            factory="optax.adamw",
            source=_OPTAX,
            doc=Doc("AdamW", "`optax.adamw`", "`2mn`", "n/a", "—"),
        ),
        Method(
            "dense_muon",
            "dense Muon",
            "dense",
            "spectral",
            0.02,
            _dense_muon,
            factory="optax.contrib.scale_by_muon",
        ),
        Method(
            "psgd_kron",
            "dense PSGD-Kron",
            "dense",
            "adam",
            1e-3,
            _psgd_kron,
            requires="psgdax",
            factory="psgdax.kron",
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
    setup = Setup(learning_rate, params, adam_learning_rate, is_matrix, options, method)
    return method.build(setup)


def _reference(method: Method) -> str:
    url = method.source or ""
    if "arxiv.org/abs/" in url:
        return f"[{url.rsplit('/', 1)[1]}]({url})"
    return f"[{method.factory.partition('.')[0]}]({url})" if url else "—"


def peers_table() -> str:
    """The peers table of ``docs/peer_optimizers.md``, from the catalogue's :attr:`Method.doc`."""
    lines = [
        "| method | call | tree | optimizer-state floats per `m×n` matrix | gauge invariant "
        "| needs from the loop | reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        if m.doc is not None:
            tree = "LoRA pairs" if m.tree == "lora" else "dense"
            d = m.doc
            cells = (d.title, d.call, tree, d.state, d.gauge, d.needs, _reference(m))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="The optimizer catalogue.")
    ap.add_argument("--table", action="store_true", help="print the docs' peers table")
    args = ap.parse_args()
    if args.table:
        print(peers_table())
    else:
        for m in METHODS.values():
            print(f"{m.name:26} {m.tree:6} {m.rate:9} {m.default_lr:<6g} {m.factory}")
