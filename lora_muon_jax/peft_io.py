"""Hugging Face PEFT adapter files in and out, without torch.

A PEFT LoRA adapter is a directory with two files: ``adapter_model.safetensors``
(the tensors, every name starting ``base_model.model.<module>.``) and
``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``,
``rank_pattern``, ``alpha_pattern``, …). PEFT adds ``c · lora_B @ lora_A`` to each
adapted weight, with ``c = lora_alpha / r`` (rsLoRA: ``lora_alpha / √r``).

What a file can hold, and what PEFT (0.21) trains of it:

* the factors ``….lora_A.weight`` ``(r, in)`` and ``….lora_B.weight`` ``(out, r)``
  (Conv: ``(r, in, kh, kw)``, ``(out, r, 1, 1)``); ``….lora_embedding_A``
  ``(r, vocab)`` and ``….lora_embedding_B`` ``(dim, r)`` for embeddings: trained;
* ``….lora_magnitude_vector`` (DoRA, ``use_dora``), ``….lora_B.bias``
  (``lora_bias=True``; PEFT adds ``c · lora_B.bias`` to the layer's bias),
  ``….token_adapter.trainable_tokens_delta`` (``trainable_token_indices``: the
  new rows of those tokens' embeddings), biases under ``bias="lora_only"``
  (``….base_layer.bias``) or ``bias="all"`` (every ``….bias``): trained, as
  plain leaves (not factors of a pair);
* the parameters of every module in ``modules_to_save`` (``….lm_head.weight`` for
  ``modules_to_save=["lm_head"]``): full copies of those modules, trained;
* anything else: copies of frozen base weights. ``save_pretrained`` writes the base
  weight of a targeted embedding or output layer (``….embed_tokens.base_layer.weight``,
  ``….lm_head.base_layer.weight``, or ``….embed_tokens.weight`` after a vocabulary
  resize), and ``from_pretrained`` loads it back into the base model, but PEFT
  never trains it (``requires_grad=False``).

:func:`load_peft_adapter` returns the trained tensors in ``params`` (a flat dict keyed
by the file's names; pass ``pairs=adapter.pairs``, which pairs the factors and
leaves every other leaf to the optimizer's AdamW fallback) and the frozen copies
apart, in ``frozen``, so that an optimizer never moves them; plus the
``lora_scale`` that :func:`lora_muon_jax.lora_muon` needs for its learning rate to
mean a spectral step of the product ``c · ΔW``. :func:`save_peft_adapter` writes
both back (the frozen copies unchanged) in the format
``peft.PeftModel.from_pretrained`` loads, and refuses what PEFT would drop without a
word: tensors of modules the config does not target, a lora bias without
``lora_bias``, and the like. Both use ``safetensors``' NumPy API; tensors keep
their dtype (bfloat16 included) and bits.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import safetensors.numpy

from lora_muon_jax import _key_paths, _pair_matching, _pair_presets, _pair_types, _validation

__all__ = [
    "PEFT_FILE_PAIRS",
    "PeftAdapter",
    "load_peft_adapter",
    "peft_lora_scale",
    "save_peft_adapter",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
# How each factor's key ends in an adapter file, and the axis holding its rank.
_FACTOR_SUFFIXES = {
    ".lora_A.weight": 0,
    ".lora_B.weight": 1,
    ".lora_embedding_A": 0,
    ".lora_embedding_B": 1,
}
# Trained tensors that are not factors, each with the config field PEFT creates it for.
_DORA = ".lora_magnitude_vector"
_LORA_BIAS = ".lora_B.bias"
_TOKENS = ".token_adapter.trainable_tokens_delta"
_BASE_LAYER = ".base_layer."
# PEFT's EMBEDDING_LAYER_NAMES: the layers "all-linear" leaves out (the output layer)
# or cannot match (embeddings are not Linear).
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
# A factor name followed by anything but its file suffix: a model's state dict
# (`lora_A.default.weight`), whose adapter name PEFT's files do not carry.
_IN_MEMORY_NAME = re.compile(
    r"\.lora_A\.(?!weight$)|\.lora_B\.(?!(?:weight|bias)$)|\.(lora_embedding_[AB])\."
)

# PEFT's rules (`pairs="peft"`) on file names only: `lora_B.weight` with
# `lora_A.weight`, so that a `lora_B.bias` (lora_bias=True) is no factor.
PEFT_FILE_PAIRS: tuple[_pair_types.PairRule, ...] = tuple(
    rule._replace(a=rule.a + ".weight", b=rule.b + ".weight") if rule.a == "lora_B" else rule
    for rule in _pair_presets.peft_adapter()
)


class PeftAdapter(NamedTuple):
    """A PEFT LoRA adapter read from disk.

    Attributes:
      params: the tensors PEFT trains, a flat dict keyed by their names in the file:
        the factors, and as plain leaves DoRA magnitudes, lora biases, base biases
        under ``bias``, ``modules_to_save`` copies and trainable-token deltas.
      config: the parsed ``adapter_config.json``.
      lora_scale: ``c`` in ``ΔW = c · lora_B @ lora_A``: ``lora_alpha / r``, or
        ``lora_alpha / √r`` with ``use_rslora``; pass it as ``lora_scale=``.
      frozen: the copies of frozen base weights the file carries (e.g.
        ``….embed_tokens.base_layer.weight``), keyed by their names in the file;
        not to be trained. Pass them to :func:`save_peft_adapter` as ``frozen=``.
    """

    params: dict[str, np.ndarray]
    config: dict[str, Any]
    lora_scale: float
    frozen: dict[str, np.ndarray]

    @property
    def pairs(self) -> tuple[_pair_types.PairRule, ...]:
        """:data:`PEFT_FILE_PAIRS`, the ``pairs=`` that reads ``params``.

        ``pairs="peft"`` (and ``"auto"``) pair the factors too, but take a lora bias
        (``….lora_B.bias``) for an unpaired factor and raise; these rules do not.
        """
        return PEFT_FILE_PAIRS


def _module_of(key: str) -> tuple[str, int] | None:
    """``(module name, rank axis)`` of a factor key, ``None`` for other tensors."""
    for suffix, rank_axis in _FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return module.removeprefix(_PREFIX), rank_axis
    return None


def _in_modules_to_save(config: Mapping[str, Any], name: str) -> bool:
    """Whether ``name`` (no prefix) is a parameter of a ``modules_to_save`` module.

    PEFT wraps every module whose name ends with an entry (plain ``str.endswith``).
    """
    entries = config.get("modules_to_save") or ()
    parts = name.split(".")
    return any(
        ".".join(parts[:i]).endswith(entry) for i in range(1, len(parts)) for entry in entries
    )


def _role(key: str, config: Mapping[str, Any]) -> str:
    """What PEFT makes of a tensor: ``"factor"``, a trained plain leaf
    (``"dora"``, ``"lora_bias"``, ``"tokens"``, ``"modules_to_save"``, ``"bias"``) or
    ``"frozen"`` (a copy of a frozen base weight)."""
    name = key.removeprefix(_PREFIX)
    if _module_of(key) is not None:
        return "factor"
    if name.endswith(_DORA):
        return "dora"
    if name.endswith(_LORA_BIAS):
        return "lora_bias"
    if name.endswith(_TOKENS):
        return "tokens"
    if _in_modules_to_save(config, name):
        return "modules_to_save"
    bias = config.get("bias") or "none"
    if name.endswith(".bias") and (
        bias == "all" or (str(bias).endswith("_only") and name.endswith(".base_layer.bias"))
    ):
        return "bias"
    return "frozen"


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule: a pattern applies when the module name ends with it (a regex),
    # at a dot boundary; the first pattern that applies wins.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_scales(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[float, list[str]]:
    """Every factor's module grouped by its scale; checks ranks against shapes."""
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"PEFT adapter config needs a number `{field}`; got {value!r}.")
    rslora = bool(config.get("use_rslora", False))
    scales: dict[float, list[str]] = {}
    for key, x in params.items():
        found = _module_of(key)
        if found is None:
            continue
        module, rank_axis = found
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if np.shape(x)[rank_axis] != r:
            raise ValueError(
                f"PEFT adapter tensor {key!r} has shape {tuple(np.shape(x))}: rank "
                f"{np.shape(x)[rank_axis]}, but the config gives module {module!r} r={r}."
            )
        scales.setdefault(float(alpha / math.sqrt(r) if rslora else alpha / r), []).append(module)
    return scales


def peft_lora_scale(config: Mapping[str, Any], params: Mapping[str, Any]) -> float:
    r"""The LoRA scale ``c`` of a PEFT adapter, checked against its tensors.

    .. math::

      c = \frac{α}{r} \quad\text{or, with rsLoRA,}\quad c = \frac{α}{\sqrt r},

    with ``r`` and ``α`` of each adapted module (``rank_pattern`` and
    ``alpha_pattern`` override ``r`` and ``lora_alpha`` per module, as in PEFT: the
    first pattern, in the config's order, that the module name ends with). The
    ranks in the config must equal the factors' shapes.

    Args:
      config: the adapter config (``adapter_config.json`` as a dict).
      params: the adapter's tensors, keyed by their names in the file.

    Returns:
      The one scale shared by every module (from ``r`` and ``lora_alpha`` when
      ``params`` holds no factor).

    Raises:
      ValueError: a missing ``r`` or ``lora_alpha``, a rank that disagrees with a
        factor's shape, or modules with different scales (``lora_muon`` takes one
        ``lora_scale``: split the tree with :func:`optax.partition`).

    Examples:
      >>> import numpy as np
      >>> from lora_muon_jax.peft_io import peft_lora_scale
      >>> params = {'base_model.model.q.lora_A.weight': np.zeros((4, 8)),
      ...           'base_model.model.q.lora_B.weight': np.zeros((6, 4))}
      >>> peft_lora_scale({'r': 4, 'lora_alpha': 8}, params)
      2.0
      >>> peft_lora_scale({'r': 4, 'lora_alpha': 8, 'use_rslora': True}, params)
      4.0
    """
    scales = _module_scales(config, params)
    if not scales:
        r, alpha = config["r"], config["lora_alpha"]
        return float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    if len(scales) > 1:
        shown = {s: sorted(set(m))[:3] for s, m in scales.items()}
        raise ValueError(
            f"PEFT adapter modules have different LoRA scales {shown} (from "
            "rank_pattern/alpha_pattern), but lora_muon takes one `lora_scale`: "
            "split the tree with optax.partition and give each part its own."
        )
    return next(iter(scales))


def load_peft_adapter(directory: str | Path) -> PeftAdapter:
    """Reads a PEFT LoRA adapter directory (no torch needed).

    The tensors PEFT trains go to ``params``, the copies of frozen base weights to
    ``frozen`` (see the module docstring for which is which): train ``params``
    only, with ``pairs=adapter.pairs``, and hand ``frozen`` back to
    :func:`save_peft_adapter`, which writes it unchanged.

    Args:
      directory: a directory with ``adapter_model.safetensors`` and
        ``adapter_config.json``, as ``PeftModel.save_pretrained`` writes it.

    Returns:
      A :class:`PeftAdapter`: ``params`` (a flat dict of NumPy arrays keyed by the
      file's names), ``config``, ``lora_scale`` and ``frozen``.

    Raises:
      FileNotFoundError: a file is missing.
      ValueError: the config is not a LoRA config, or as :func:`peft_lora_scale`.

    Examples:
      >>> import tempfile, numpy as np
      >>> from lora_muon_jax.peft_io import load_peft_adapter, save_peft_adapter
      >>> params = {'base_model.model.q.lora_A.weight': np.ones((2, 8), np.float32),
      ...           'base_model.model.q.lora_B.weight': np.zeros((6, 2), np.float32)}
      >>> config = {'peft_type': 'LORA', 'r': 2, 'lora_alpha': 4, 'target_modules': ['q']}
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = save_peft_adapter(params, d, config)
      ...     adapter = load_peft_adapter(d)
      >>> sorted(adapter.params), adapter.lora_scale, adapter.frozen
      (['base_model.model.q.lora_A.weight', 'base_model.model.q.lora_B.weight'], 2.0, {})

    References:
      Hugging Face PEFT, `LoRA <https://huggingface.co/docs/peft/package_reference/lora>`_.
    """
    directory = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"load_peft_adapter: no {name} in {directory}.")
    config = json.loads((directory / CONFIG_NAME).read_text())
    _check_config("load_peft_adapter", config)
    tensors = safetensors.numpy.load_file(directory / WEIGHTS_NAME)
    params = {k: v for k, v in tensors.items() if _role(k, config) != "frozen"}
    frozen = {k: v for k, v in tensors.items() if k not in params}
    return PeftAdapter(params, config, peft_lora_scale(config, params), frozen)


def _check_config(fn: str, config: Any) -> None:
    if not isinstance(config, Mapping):
        raise TypeError(f"{fn}: the adapter config must be a dict; got {type(config)}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{fn}: only LoRA adapters are supported (config `peft_type` 'LORA'); got "
            f"{config.get('peft_type')!r}."
        )


def _flat_tensors(fn: str, params: Any) -> dict[str, np.ndarray]:
    """A flat ``{file name: contiguous NumPy array}`` from a flat or nested tree."""
    paths, leaves, _ = _key_paths.flatten_with_paths(params)
    out = {}
    for path, leaf in zip(paths, leaves, strict=True):
        key = ".".join(_key_paths.path_names(path))
        if _IN_MEMORY_NAME.search(key):
            raise ValueError(
                f"{fn}: {key!r} is a model state-dict name with an adapter name after "
                "the factor; adapter files drop it (`….lora_A.weight`, "
                "`….lora_embedding_A`). Rename the keys (e.g. remove '.default')."
            )
        if not key.startswith(_PREFIX):
            raise ValueError(
                f"{fn}: {key!r} does not start with {_PREFIX!r}; PeftModel.from_pretrained "
                "would drop it without a warning. Name tensors as PEFT's files do."
            )
        out[key] = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    return out


def _json_value(fn: str, field: str, value: Any) -> Any:
    """``value`` as JSON writes and reads it back: sets become sorted lists."""
    if isinstance(value, enum.Enum):  # PEFT's in-memory config: PeftType.LORA, TaskType
        value = value.value
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_value(fn, f"{field}.{k}", v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        items = [_json_value(fn, field, v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(value, (list, tuple)):
        return [_json_value(fn, field, v) for v in value]
    raise TypeError(
        f"{fn}: config field {field!r} holds a {type(value).__name__} ({value!r}), which "
        "adapter_config.json cannot hold; give a str, number, bool, None, list, set or dict."
    )


def _config_to_write(fn: str, config: Mapping[str, Any], tensors: Mapping[str, Any]) -> str:
    """The ``adapter_config.json`` text: keys sorted as PEFT writes them, every
    nested dict (``rank_pattern``, ``alpha_pattern``) in the order given, sets as
    sorted lists, and ``target_modules`` filled in when missing."""
    written = {str(k): _json_value(fn, str(k), v) for k, v in sorted(config.items())}
    if written.get("target_modules") is None and not written.get("target_parameters"):
        # PEFT would fall back to its per-model default (Llama: q_proj, v_proj) and
        # drop every other module's tensors: name the adapted modules exactly.
        modules = {found[0] for k in tensors if (found := _module_of(k)) is not None}
        written["target_modules"] = sorted(modules)
    return json.dumps(written, indent=2)


def _targeted(config: Mapping[str, Any], module: str, *, linear: bool) -> bool:
    """Whether PEFT puts a LoRA layer on ``module`` (its name without the prefix).

    PEFT 0.21's ``check_target_module_exists``, plus ``target_parameters``;
    ``"all-linear"`` (which PEFT resolves from the model's classes) is read as every
    ``linear`` module (2-D factors: not an embedding, not a Conv) but the output
    layer (``lm_head``).
    """
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or ()):
        return False  # PEFT never adapts a module it saves whole
    for parameter in config.get("target_parameters") or ():
        # PEFT wraps the module owning parameter `<module>.<param>` when that name
        # equals the entry or ends with `.<entry>`.
        owner = parameter.rpartition(".")[0]
        if not owner or module == owner or module.endswith(f".{owner}"):
            return True
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return linear and module.rpartition(".")[2] not in _EMBEDDING_LAYER_NAMES
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    found = any(module.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        pattern = config.get("layers_pattern")
        match = None
        if not pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers
    return found


def _shown(names: list[str]) -> str:
    return _validation.shown([repr(n) for n in names])


def _factor_modules(params: Mapping[str, np.ndarray]) -> dict[str, bool]:
    """Every module with LoRA factors in ``params`` -> whether it is a Linear layer."""
    modules: dict[str, bool] = {}
    for key, x in params.items():
        found = _module_of(key)
        if found is not None:  # Linear: 2-D lora_A/lora_B (Conv: 4-D; embeddings)
            modules[found[0]] = key.endswith(".weight") and np.ndim(x) == 2
    return modules


def _check_param_tensor(
    fn: str,
    key: str,
    config: Mapping[str, Any],
    params: Mapping[str, np.ndarray],
    factor_modules: dict[str, bool],
) -> None:
    """Refuses one trainable tensor that PEFT would not load (or not train) under ``config``."""
    role = _role(key, config)
    name = key.removeprefix(_PREFIX)
    if role == "frozen":
        if name.endswith(".bias"):
            what = (
                "a bias, which PEFT trains only with bias='all' (or 'lora_only' for "
                f"`….base_layer.bias`); the config has bias={config.get('bias')!r}"
            )
        elif _BASE_LAYER in "." + name:
            what = (
                "a copy of a frozen base weight (save_pretrained writes the base "
                "weight of a targeted embedding or output layer beside its adapter)"
            )
        else:
            what = "neither a LoRA tensor nor a parameter of a `modules_to_save` module"
        raise ValueError(
            f"{fn}: {key!r} is {what}, so PEFT does not train it. Pass it in "
            "`frozen=` to write it unchanged (load_peft_adapter returns such tensors "
            "in `.frozen`), or add its module to `modules_to_save`."
        )
    needs = {"dora": "use_dora", "lora_bias": "lora_bias", "tokens": "trainable_token_indices"}
    if role in needs and not config.get(needs[role]):
        raise ValueError(
            f"{fn}: {key!r} is created by PEFT only with `{needs[role]}` set, but the "
            f"config has {needs[role]}={config.get(needs[role])!r}: "
            "PeftModel.from_pretrained would drop it without a warning."
        )
    suffix = {"dora": _DORA, "lora_bias": _LORA_BIAS}.get(role)
    if suffix is None:
        return
    module = name[: -len(suffix)]
    if module not in factor_modules:
        raise ValueError(
            f"{fn}: {key!r} belongs to module {module!r}, which has no LoRA factors in `params`."
        )
    if role == "lora_bias" and f"{_PREFIX}{module}.lora_embedding_A" in params:
        raise ValueError(
            f"{fn}: {key!r} is a lora_bias of an embedding; PEFT supports "
            "lora_bias only for Linear and Conv layers."
        )


def _check_frozen_tensor(
    fn: str, key: str, config: Mapping[str, Any], factor_modules: dict[str, bool]
) -> None:
    """Refuses a tensor passed as frozen that PEFT trains, or whose module it would not build."""
    name = key.removeprefix(_PREFIX)
    if _role(key, config) in ("factor", "dora", "lora_bias", "tokens"):
        raise ValueError(
            f"{fn}: {key!r} is a LoRA tensor that PEFT trains; pass it in `params`, "
            "not in `frozen`."
        )
    if _BASE_LAYER in "." + name:
        module = ("." + name).split(_BASE_LAYER)[0][1:]
        if module not in factor_modules:
            raise ValueError(
                f"{fn}: {key!r} is the base weight of module {module!r}, which has no "
                "LoRA factors, so PEFT has no `base_layer` there and would drop it."
            )


def _check_tensors(
    fn: str,
    config: Mapping[str, Any],
    params: Mapping[str, np.ndarray],
    frozen: Mapping[str, np.ndarray],
) -> None:
    """Refuses every tensor ``PeftModel.from_pretrained`` would not load under ``config``."""
    factor_modules = _factor_modules(params)
    for key in params:
        _check_param_tensor(fn, key, config, params, factor_modules)
    _pair_matching.find_lora_pairs(dict(params), PEFT_FILE_PAIRS)  # raises on unpaired factors
    for key in frozen:
        _check_frozen_tensor(fn, key, config, factor_modules)
    uncovered = sorted(
        m for m, linear in factor_modules.items() if not _targeted(config, m, linear=linear)
    )
    if uncovered:
        raise ValueError(
            f"{fn}: the config does not target {len(uncovered)} adapted module(s): "
            f"{_shown(uncovered)} (target_modules="
            f"{config.get('target_modules')!r}, exclude_modules={config.get('exclude_modules')!r}, "
            f"modules_to_save={config.get('modules_to_save')!r}, layers_to_transform="
            f"{config.get('layers_to_transform')!r}), so PeftModel.from_pretrained would "
            "drop their tensors without a warning. Add them to `target_modules`, or leave "
            "`target_modules` out to have it filled with every adapted module."
        )
    _module_scales(config, params)  # raises on ranks that disagree with the config


def save_peft_adapter(
    params: Any,
    directory: str | Path,
    config: Mapping[str, Any],
    *,
    frozen: Any = None,
) -> Path:
    """Writes a LoRA adapter in PEFT's format, for ``PeftModel.from_pretrained``.

    The config is checked against the tensors so that PEFT loads every one of them:
    each adapted module must be targeted (``target_modules``, ``exclude_modules``,
    ``modules_to_save``, ``layers_to_transform`` as PEFT reads them; a missing or
    ``None`` ``target_modules`` is filled with the adapted modules' full names, as
    PEFT would otherwise use its per-model default), DoRA magnitudes need
    ``use_dora``, lora biases ``lora_bias``, token deltas
    ``trainable_token_indices``, and every other tensor of ``params`` must be one
    PEFT trains (a ``modules_to_save`` parameter, or a bias under ``bias``).

    The config is written as JSON: top-level keys sorted (as PEFT writes them),
    nested dicts in the order given (the first ``rank_pattern`` or
    ``alpha_pattern`` entry a module matches wins, in PEFT as here), sets (PEFT's
    in-memory ``LoraConfig.to_dict()`` holds ``target_modules`` as one) as sorted
    lists, tuples as lists, enums as their values. The checks run on the text
    written, read back.

    Args:
      params: the trained tensors (as :attr:`PeftAdapter.params`): a flat dict keyed
        by PEFT file names (``base_model.model.<module>.lora_A.weight``,
        ``…lora_B.weight``, ``…lora_embedding_A``/``B``, ``…lora_magnitude_vector``,
        ``…lora_B.bias``, …), or the same names as nested dicts split at the dots.
        JAX or NumPy arrays; each keeps its dtype and bits.
      directory: where to write ``adapter_model.safetensors`` and
        ``adapter_config.json`` (created if missing).
      config: the adapter config: at least ``peft_type`` (``"LORA"``), ``r`` and
        ``lora_alpha``; a dict, ``LoraConfig.to_dict()``, or a ``peft.LoraConfig``
        (read through its ``to_dict()``).
      frozen: copies of frozen base weights to write unchanged beside ``params``
        (:attr:`PeftAdapter.frozen`), flat or nested like ``params``; ``None`` for
        none.

    Returns:
      ``directory`` as a :class:`pathlib.Path`.

    Raises:
      ValueError: a non-LoRA config, state-dict names with an adapter name, a name
        without ``base_model.model.``, an unpaired factor, ranks that disagree with
        the config, a tensor PEFT would drop (naming it and the config field), or a
        name in both ``params`` and ``frozen``.
      TypeError: a config value JSON cannot hold (naming the field).

    Examples:
      See :func:`load_peft_adapter`.
    """
    fn = "save_peft_adapter"
    if not isinstance(config, Mapping) and callable(getattr(config, "to_dict", None)):
        config = config.to_dict()  # a peft.LoraConfig
    _check_config(fn, config)
    tensors = _flat_tensors(fn, params)
    base = {} if frozen is None else _flat_tensors(fn, frozen)
    both = sorted(set(tensors) & set(base))
    if both:
        raise ValueError(f"{fn}: {_shown(both)} given both in `params` and in `frozen`.")
    text = _config_to_write(fn, config, tensors)
    written = json.loads(text)  # check what PEFT will read
    _check_config(fn, written)
    _check_tensors(fn, written, tensors, base)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors | base, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(text + "\n")
    return directory
