"""The LoRA scale ``c`` that a library's adapters apply, read from its own objects.

An adapter adds ``c · a @ b`` to a weight, and :func:`lora_muon_jax.lora_muon`
needs that ``c`` as ``lora_scale=`` for its learning rate to mean a spectral step
of the product. Libraries keep ``c`` in their config objects rather than in the
factors, so it is read from them:

* qwix (and Tunix, which uses qwix for LoRA): ``qwix.LoraProvider(rank=r,
  alpha=α)`` and ``qwix.LoraRule`` add ``(α / r) · x @ a @ b``;
  :func:`qwix_lora_scale` reads the provider's rules.
* Hugging Face PEFT: ``LoraConfig`` / ``adapter_config.json`` gives ``lora_alpha /
  r`` (rsLoRA: ``lora_alpha / √r``), with ``rank_pattern`` / ``alpha_pattern``
  per module; :func:`peft_config_lora_scale` reads the config alone, and
  :func:`lora_muon_jax.peft_io.peft_lora_scale` checks it against the tensors.

Nothing here imports qwix or peft: the objects are read through their attributes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lora_muon_jax.peft_io import _pattern_value, peft_lora_scale

__all__ = ["peft_config_lora_scale", "qwix_lora_scale"]


def _qwix_rules(provider: Any) -> list[Any]:
    """The rules of a qwix provider (``_rules``), a rule, or a sequence of rules."""
    if hasattr(provider, "rank") and hasattr(provider, "alpha"):
        return [provider]  # one LoraRule
    rules = getattr(provider, "_rules", getattr(provider, "rules", provider))
    if isinstance(rules, Sequence) and not isinstance(rules, str):
        return list(rules)
    raise TypeError(
        "qwix_lora_scale: expected a qwix.LoraProvider, a qwix.LoraRule or a sequence "
        f"of rules; got {type(provider).__name__}."
    )


def _rule_scale(rule: Any) -> float:
    rank, alpha = rule.rank, rule.alpha
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"qwix rule {rule.module_path!r} has rank {rank!r}; expected an int >= 1.")
    return float(alpha) / rank


def qwix_lora_scale(provider: Any, module_path: str | None = None) -> float:
    """The scale ``alpha / rank`` that a qwix ``LoraProvider`` applies to its adapters.

    qwix adds ``(alpha / rank) · x @ lora_a @ lora_b`` for every op that a
    ``LoraRule`` matches (the first rule whose ``module_path`` regex fully matches
    the module's path, ``/``-joined, as qwix picks it). Rules without ``rank`` and
    ``alpha`` (quantization-only ``QtRule``) add no adapter and are skipped.

    Args:
      provider: a ``qwix.LoraProvider`` (its rules are read), one ``qwix.LoraRule``,
        or a sequence of rules; anything with ``rank``, ``alpha`` and
        ``module_path`` attributes works.
      module_path: the path of one module (e.g. ``"layers/0/attn/q_einsum"``): the
        scale of the rule qwix applies there. ``None``: the scale every LoRA rule
        shares.

    Returns:
      ``alpha / rank`` as a float, to pass as ``lora_muon(..., lora_scale=...)``.

    Raises:
      ValueError: no LoRA rule (or none for ``module_path``), or, with
        ``module_path=None``, LoRA rules with different scales (``lora_muon`` takes
        one ``lora_scale``: split the tree with :func:`optax.partition`).

    Examples:
      >>> from types import SimpleNamespace as Rule
      >>> from lora_muon_jax import qwix_lora_scale
      >>> qwix_lora_scale(Rule(module_path='.*', rank=4, alpha=8.0))
      2.0
      >>> rules = [Rule(module_path='.*attn.*', rank=4, alpha=2.0),
      ...          Rule(module_path='.*', rank=8, alpha=4.0)]
      >>> qwix_lora_scale(rules, module_path='layers/0/mlp/up_proj')
      0.5
    """
    rules = _qwix_rules(provider)
    if module_path is not None:
        for rule in rules:
            if re.fullmatch(getattr(rule, "module_path", ".*"), module_path):
                if not (hasattr(rule, "rank") and hasattr(rule, "alpha")):
                    raise ValueError(
                        f"qwix_lora_scale: module {module_path!r} matches rule "
                        f"{rule.module_path!r} first, which adds no LoRA adapter."
                    )
                return _rule_scale(rule)
        raise ValueError(f"qwix_lora_scale: no rule matches module {module_path!r}.")
    lora = [r for r in rules if hasattr(r, "rank") and hasattr(r, "alpha")]
    if not lora:
        raise ValueError("qwix_lora_scale: the provider has no LoRA rule (rank, alpha).")
    scales = {r.module_path: _rule_scale(r) for r in lora}
    if len(set(scales.values())) > 1:
        raise ValueError(
            f"qwix_lora_scale: the LoRA rules have different scales {scales} (module "
            "path -> alpha/rank), but lora_muon takes one `lora_scale`: pass "
            "`module_path=` for one module's, and split the tree with optax.partition."
        )
    return next(iter(scales.values()))


def _as_config(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    if hasattr(config, "to_dict"):  # peft.LoraConfig
        out = config.to_dict()
        if isinstance(out, Mapping):
            return out
    raise TypeError(
        "peft_config_lora_scale: expected adapter_config.json as a dict or a "
        f"peft.LoraConfig; got {type(config).__name__}."
    )


def _scale(r: Any, alpha: Any, rslora: bool, where: str) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
        raise ValueError(f"PEFT adapter config: rank {r!r} for {where} is not a positive number.")
    return float(alpha / math.sqrt(r) if rslora else alpha / r)


def peft_config_lora_scale(config: Any, module: str | None = None) -> float:
    r"""The scale a PEFT ``LoraConfig`` gives its adapters, from the config alone.

    .. math::

      c = \frac{α}{r} \quad\text{or, with } \texttt{use\_rslora}, \quad
      c = \frac{α}{\sqrt r},

    with ``r = rank_pattern`` and ``α = alpha_pattern`` of the module where a
    pattern matches it (PEFT's rule: the module name ends with the pattern, at a
    dot boundary), else the config's ``r`` and ``lora_alpha``. To check the ranks
    against an adapter's tensors too, use
    :func:`lora_muon_jax.peft_io.peft_lora_scale`.

    Args:
      config: ``adapter_config.json`` as a dict, or a ``peft.LoraConfig`` (read
        through its ``to_dict()``).
      module: a module name (``"model.layers.0.self_attn.q_proj"``) to apply the
        patterns to. ``None``: the scale every module shares, which must then be
        the same for every pattern.

    Returns:
      ``c`` as a float, to pass as ``lora_muon(..., lora_scale=...)``.

    Raises:
      ValueError: a missing or non-numeric ``r`` or ``lora_alpha``, or, with
        ``module=None``, patterns that give some modules another scale (name the
        module, or split the tree with :func:`optax.partition`).

    Examples:
      >>> from lora_muon_jax import peft_config_lora_scale
      >>> peft_config_lora_scale({'r': 8, 'lora_alpha': 16})
      2.0
      >>> peft_config_lora_scale({'r': 16, 'lora_alpha': 16, 'use_rslora': True})
      4.0
      >>> cfg = {'r': 8, 'lora_alpha': 16, 'rank_pattern': {'v_proj': 4}}
      >>> peft_config_lora_scale(cfg, 'model.layers.0.self_attn.v_proj')
      4.0
    """
    config = _as_config(config)
    if isinstance(config.get("r"), (int, float)):
        _scale(config["r"], 0.0, False, "the config")  # r > 0 before peft_lora_scale divides
    default = peft_lora_scale(config, {})  # checks that `r` and `lora_alpha` are numbers
    rslora = bool(config.get("use_rslora", False))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if module is not None:
        r = _pattern_value(ranks, module, config["r"])
        alpha = _pattern_value(alphas, module, config["lora_alpha"])
        return _scale(r, alpha, rslora, f"module {module!r}")
    scales = {"(default)": default}
    for pattern in {**ranks, **alphas}:
        r = ranks.get(pattern, config["r"])
        alpha = alphas.get(pattern, config["lora_alpha"])
        scales[pattern] = _scale(r, alpha, rslora, f"pattern {pattern!r}")
    if len(set(scales.values())) > 1:
        raise ValueError(
            f"PEFT adapter config gives different LoRA scales {scales} (pattern -> "
            "scale, from rank_pattern/alpha_pattern), but lora_muon takes one "
            "`lora_scale`: pass `module=` for one module's, and split the tree with "
            "optax.partition."
        )
    return default
