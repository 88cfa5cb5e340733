"""A small character-level transformer whose matrices are native low-rank LoRA pairs.

:class:`CharTransformer` is the model of the examples, the end-to-end benchmark and
the learning-rate transfer study (char-level TinyShakespeare at width 128 is the
setting reported for the LoRA-Muon paper). Every attention and MLP matrix is a product
``c · lora_a @ lora_b`` of two random ``nnx.LoRAParam`` factors with no dense base;
embeddings, norms and the output head are plain ``nnx.Param`` (``lora_muon`` sends them
to AdamW). With ``rank=None`` the same architecture has dense ``nnx.Linear`` kernels,
for dense Muon or AdamW baselines.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["CharTransformer", "LowRankLinear", "generate", "loss_fn"]


def _check_positive_int(name: str, value: Any, fn: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int; got {value!r}.")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _orthogonal(key: jax.Array, shape: tuple[int, ...], dtype: Any, scale: jax.Array) -> jax.Array:
    # One compiled call per shape instead of a dozen eager ops: model construction
    # is otherwise dominated by compiling those ops, several seconds on a busy CPU.
    return nnx.initializers.orthogonal()(key, shape, dtype) * scale.astype(dtype)


def _orthogonal_init(scale: float) -> nnx.Initializer:
    """A semi-orthogonal initializer: every singular value equals ``scale``."""

    def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        return _orthogonal(key, tuple(shape), jnp.dtype(dtype), jnp.asarray(scale))

    return init


def _spectral_gain(in_features: int, out_features: int) -> float:
    # The spectral condition for feature learning: ‖W‖₂ ≈ sqrt(fan_out / fan_in)
    # keeps every layer's output on the scale of its input at any width.
    return math.sqrt(out_features / in_features)


class LowRankLinear(nnx.Module):
    r"""A linear map ``x ↦ c · x @ lora_a @ lora_b`` made only of two LoRA factors.

    Both factors are random semi-orthogonal matrices with the same spectral norm,

    .. math::

      ‖a‖_2 = ‖b‖_2 = \sqrt{g / c}, \qquad g = \sqrt{d_{out} / d_{in}},

    so the product ``c · a @ b`` has all its ``r`` singular values equal to ``g`` (the
    spectral-condition scale of a dense layer) whatever ``c``, and the pair starts
    balanced. ``lora_scale`` therefore changes only how the factors move, like PEFT's
    ``alpha / r``; pass the same value to ``lora_muon(lora_scale=...)``.

    Args:
      in_features: input size ``m``.
      out_features: output size ``n``.
      rank: the rank ``r``.
      lora_scale: the constant ``c``.
      rngs: random streams; uses ``rngs.params``.

    Raises:
      ValueError: a size that is not a positive int, or ``lora_scale <= 0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lora_muon_jax_examples.char_lm import LowRankLinear
      >>> layer = LowRankLinear(16, 64, 4, rngs=nnx.Rngs(0))
      >>> layer.lora_a.shape, layer.lora_b.shape, type(layer.lora_a).__name__
      ((16, 4), (4, 64), 'LoRAParam')
      >>> s = jnp.linalg.svd(layer.lora_a[...] @ layer.lora_b[...], compute_uv=False)
      >>> print(jnp.round(s[:5], 3))  # four singular values sqrt(64 / 16), then zeros
      [2. 2. 2. 2. 0.]

    References:
      Yang, Simon, Bernstein, `A Spectral Condition for Feature Learning
      <https://arxiv.org/abs/2310.17813>`_, 2023
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        lora_scale: float = 1.0,
        rngs: nnx.Rngs,
    ) -> None:
        for name, value in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("rank", rank),
        ):
            _check_positive_int(name, value, "LowRankLinear")
        if not lora_scale > 0:
            raise ValueError(f"LowRankLinear: `lora_scale` must be > 0; got {lora_scale!r}.")
        per_factor = math.sqrt(_spectral_gain(in_features, out_features) / lora_scale)
        init = _orthogonal_init(per_factor)
        # b is drawn as (out, rank) and transposed: both factors then come from
        # tall shapes, fewer distinct shapes to compile (QR compiles slowly on CPU).
        self.lora_a = nnx.LoRAParam(init(rngs.params(), (in_features, rank)))
        self.lora_b = nnx.LoRAParam(init(rngs.params(), (out_features, rank)).T)
        self.lora_scale = float(lora_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Two thin matmuls: the m × n product is never formed. Rows are flattened to
        # 2-D first: XLA:CPU is several times slower at the weight gradients of
        # (batch, length, m) @ (m, r) than of the same product in 2-D.
        lead = x.shape[:-1]
        y = (x.reshape(-1, x.shape[-1]) @ self.lora_a[...]) @ self.lora_b[...]
        y = y.reshape(*lead, y.shape[-1])
        return y if self.lora_scale == 1.0 else y * self.lora_scale


def _linear(
    in_features: int,
    out_features: int,
    rank: int | None,
    lora_scale: float,
    rngs: nnx.Rngs,
) -> nnx.Module:
    if rank is None:
        gain = _spectral_gain(in_features, out_features)
        return nnx.Linear(
            in_features,
            out_features,
            use_bias=False,
            kernel_init=_orthogonal_init(gain),
            rngs=rngs,
        )
    return LowRankLinear(in_features, out_features, rank, lora_scale=lora_scale, rngs=rngs)


class _Attention(nnx.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        rank: int | None,
        lora_scale: float,
        rngs: nnx.Rngs,
    ) -> None:
        self.q = _linear(width, width, rank, lora_scale, rngs)
        self.k = _linear(width, width, rank, lora_scale, rngs)
        self.v = _linear(width, width, rank, lora_scale, rngs)
        self.o = _linear(width, width, rank, lora_scale, rngs)
        self.heads = heads

    def __call__(self, x: jax.Array, batch: int, length: int) -> jax.Array:
        # x holds the rows of all sequences, (batch * length, width).
        width = x.shape[-1]
        split = (batch, length, self.heads, width // self.heads)
        q, k, v = (f(x).reshape(split) for f in (self.q, self.k, self.v))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.reshape(batch * length, width))


class _MLP(nnx.Module):
    def __init__(
        self,
        width: int,
        hidden: int,
        rank: int | None,
        lora_scale: float,
        rngs: nnx.Rngs,
    ) -> None:
        self.up = _linear(width, hidden, rank, lora_scale, rngs)
        self.down = _linear(hidden, width, rank, lora_scale, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class _Block(nnx.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        hidden: int,
        rank: int | None,
        lora_scale: float,
        rngs: nnx.Rngs,
    ) -> None:
        self.attn_norm = nnx.RMSNorm(width, rngs=rngs)
        self.attn = _Attention(width, heads, rank, lora_scale, rngs)
        self.mlp_norm = nnx.RMSNorm(width, rngs=rngs)
        self.mlp = _MLP(width, hidden, rank, lora_scale, rngs)

    def __call__(self, x: jax.Array, batch: int, length: int) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), batch, length)
        return x + self.mlp(self.mlp_norm(x))


class CharTransformer(nnx.Module):
    """A pre-norm causal transformer for character-level language modelling.

    Layout: token embedding + learned positions, ``depth`` blocks of causal
    multi-head attention and a GELU MLP (each behind an RMSNorm, with residuals), a
    final RMSNorm and a linear head. The six matrices of every block (``q``, ``k``,
    ``v``, ``o``, ``up``, ``down``) are :class:`LowRankLinear` pairs of rank ``rank``,
    found by :func:`lora_muon_jax.find_lora_pairs` at paths such as
    ``['blocks'][0]['attn']['q']['lora_a']``. Everything else is ``nnx.Param``.
    Blocks are a Python list, so every factor is a plain 2-D matrix (what
    ``optax.contrib.muon`` expects of the dense twin too).

    Args:
      vocab_size: number of token ids.
      width: model width; a multiple of ``heads``.
      depth: number of blocks.
      heads: attention heads.
      rank: rank of every adapter pair, or ``None`` for the dense twin (plain
        ``nnx.Linear`` kernels, no bias).
      seq_len: the longest input (size of the position table).
      mlp_ratio: MLP hidden size over ``width``.
      lora_scale: the constant ``c`` of ``c · a @ b`` (ignored when dense).
      rngs: random streams.

    Raises:
      ValueError: a size that is not a positive int, or ``width % heads != 0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lora_muon_jax import find_lora_pairs
      >>> from lora_muon_jax_examples.char_lm import CharTransformer
      >>> model = CharTransformer(10, width=16, depth=1, heads=2, rank=2, seq_len=8,
      ...                         rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8), jnp.int32)).shape
      (2, 8, 10)
      >>> pairs = find_lora_pairs(nnx.state(model, nnx.LoRAParam))
      >>> len(pairs), pairs[0].a_path, (pairs[0].m, pairs[0].n, pairs[0].rank)
      (6, "['blocks'][0]['attn']['k']['lora_a']", (16, 16, 2))
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        rank: int | None = 8,
        seq_len: int = 64,
        mlp_ratio: int = 4,
        lora_scale: float = 1.0,
        rngs: nnx.Rngs,
    ) -> None:
        fn = "CharTransformer"
        for name, value in (
            ("vocab_size", vocab_size),
            ("width", width),
            ("depth", depth),
            ("heads", heads),
            ("seq_len", seq_len),
            ("mlp_ratio", mlp_ratio),
        ):
            _check_positive_int(name, value, fn)
        if rank is not None:
            _check_positive_int("rank", rank, fn)
        if width % heads:
            raise ValueError(f"{fn}: `width`={width} must be a multiple of `heads`={heads}.")
        self.embed = nnx.Embed(vocab_size, width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, width)))
        self.blocks = nnx.List(
            [_Block(width, heads, mlp_ratio * width, rank, lora_scale, rngs) for _ in range(depth)]
        )
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        # A zero head starts every model at the uniform prediction, loss log(vocab).
        self.head = nnx.Linear(
            width,
            vocab_size,
            use_bias=False,
            kernel_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        self.seq_len = seq_len
        self.rank = rank

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(batch, length, vocab)`` for int tokens ``(batch, length)``."""
        length = tokens.shape[-1]
        if length > self.seq_len:
            raise ValueError(
                f"CharTransformer: input length {length} exceeds `seq_len`={self.seq_len}."
            )
        lead = tokens.shape[:-1]
        batch = math.prod(lead)
        x = self.embed(tokens) + self.pos[...][:length]
        # Rows stay 2-D, (batch * length, width), between attention calls: every
        # matmul is then a plain 2-D one, whose gradients XLA:CPU computes fastest.
        x = x.reshape(batch * length, -1)
        for block in self.blocks:
            x = block(x, batch, length)
        return self.head(self.norm(x)).reshape(*lead, length, -1)


def loss_fn(model: CharTransformer, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy (nats) of ``batch = (inputs, targets)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lora_muon_jax_examples.char_lm import CharTransformer, loss_fn
      >>> model = CharTransformer(10, width=16, depth=1, heads=2, rank=2, seq_len=8,
      ...                         rngs=nnx.Rngs(0))
      >>> x = jnp.zeros((2, 8), jnp.int32)
      >>> print(f"{loss_fn(model, (x, x)):.3f}")  # log(10): the head starts at zero
      2.303
    """
    inputs, targets = batch
    logits = model(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "temperature"))
def _generate(graphdef, state, buffer, prompt_len, key, steps, temperature):
    model = nnx.merge(graphdef, state)
    window = model.seq_len

    def step(carry, key):
        buffer, length = carry
        start = jnp.maximum(length - window, 0)
        context = jax.lax.dynamic_slice_in_dim(buffer, start, window)
        # Causal attention: positions after `length` (still zero) cannot leak back.
        logits = model(context[None])[0, length - 1 - start]
        if temperature == 0.0:
            token = jnp.argmax(logits)
        else:
            token = jax.random.categorical(key, logits / temperature)
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, token.astype(buffer.dtype), length, 0)
        return (buffer, length + 1), None

    (buffer, _), _ = jax.lax.scan(step, (buffer, prompt_len), jax.random.split(key, steps))
    return buffer


def generate(
    model: CharTransformer,
    prompt: Any,
    steps: int,
    key: jax.Array,
    *,
    temperature: float = 1.0,
) -> jax.Array:
    """Samples ``steps`` tokens after ``prompt``, one at a time, in one compiled scan.

    Each step reads the model's logits on the last ``seq_len`` tokens (no KV cache;
    the models here are small) and samples from ``softmax(logits / temperature)``.

    Args:
      model: a :class:`CharTransformer`.
      prompt: 1-D int token ids, at least one.
      steps: number of tokens to add. Static.
      key: PRNG key.
      temperature: sampling temperature; ``0`` takes the argmax. Static.

    Returns:
      int32 ids of shape ``(len(prompt) + steps,)``, starting with ``prompt``.

    Raises:
      ValueError: an empty or non-1-D prompt, ``steps < 0`` or ``temperature < 0``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from lora_muon_jax_examples.char_lm import CharTransformer, generate
      >>> model = CharTransformer(10, width=16, depth=1, heads=2, rank=2, seq_len=8,
      ...                         rngs=nnx.Rngs(0))
      >>> out = generate(model, jnp.array([1, 2, 3]), 12, jax.random.key(0))
      >>> out.shape, out[:3].tolist()
      ((15,), [1, 2, 3])
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 1 or prompt.shape[0] < 1:
        raise ValueError(f"generate: `prompt` must be 1-D and non-empty; got {prompt.shape}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"generate: `steps` must be an int >= 0; got {steps!r}.")
    if not temperature >= 0:
        raise ValueError(f"generate: `temperature` must be >= 0; got {temperature!r}.")
    total = prompt.shape[0] + steps
    # Room for a full window even when the prompt is short; trimmed below.
    buffer = jnp.zeros(max(total, model.seq_len), jnp.int32).at[: prompt.shape[0]].set(prompt)
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, buffer, prompt.shape[0], key, steps, float(temperature))
    return out[:total]
