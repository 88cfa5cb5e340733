"""The small character transformer: layout, init, causality, pairs and trainability."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lora_muon_jax import find_lora_pairs, lora_muon, lora_param_labels
from lora_muon_jax_examples.char_lm import CharTransformer, LowRankLinear, generate, loss_fn

VOCAB = 11
SMALL = dict(width=32, depth=2, heads=4, rank=4, seq_len=16)
# (name, (m, n)) of every adapted matrix in a block, width 32, mlp_ratio 4.
MATRICES = {
    "q": (32, 32),
    "k": (32, 32),
    "v": (32, 32),
    "o": (32, 32),
    "up": (32, 128),
    "down": (128, 32),
}


def _model(**kw):
    return CharTransformer(VOCAB, **{**SMALL, **kw}, rngs=nnx.Rngs(0))


# Jitted calls: eager op-by-op dispatch of a whole model is slow on a busy CPU.
_apply = nnx.jit(lambda model, tokens: model(tokens))


@pytest.mark.parametrize("rank", [4, None])
def test_shapes_and_variable_types(rank):
    model = _model(rank=rank)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, VOCAB)
    logits = _apply(model, tokens)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == jnp.float32
    # The head starts at zero: a uniform prediction, loss log(vocab), for any model.
    np.testing.assert_array_equal(logits, 0.0)
    assert jax.eval_shape(model, tokens[:, :5]).shape == (2, 5, VOCAB)  # shorter inputs
    assert jax.eval_shape(model, tokens[0]).shape == (16, VOCAB)  # unbatched inputs
    lora = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    plain = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    names = {
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(plain))
    }
    if rank is None:
        assert lora == []
        assert sum("kernel" in n for n in names) == 6 * 2 + 1  # 6 per block + head
    else:
        assert len(lora) == 2 * 6 * 2
        assert {x.shape for x in lora} == {(32, 4), (4, 32), (128, 4), (4, 128)}
        # Only the head is a dense kernel; the adapted matrices have no dense base.
        assert [n for n in names if "kernel" in n] == ["['head']['kernel']"]


def test_lora_factors_are_found_as_pairs():
    model = _model()
    pairs = find_lora_pairs(nnx.state(model, nnx.LoRAParam))
    found = {(p.a_path, p.b_path): (p.m, p.n, p.rank) for p in pairs}
    expected = {}
    for layer in range(2):
        for group, names in (("attn", "qkvo"), ("mlp", ("up", "down"))):
            for name in names:
                where = f"['blocks'][{layer}]['{group}']['{name}']"
                expected[(f"{where}['lora_a']", f"{where}['lora_b']")] = (
                    *MATRICES[name],
                    4,
                )
    assert found == expected
    # On the full parameter state, exactly the factors are labelled LoRA (embeddings,
    # norms, positions and head go to AdamW inside lora_muon).
    labels = lora_param_labels()(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(labels)}
    assert sum(v == "lora" for v in flat.values()) == 24
    assert all(("lora_" in k) == (v == "lora") for k, v in flat.items())


@pytest.mark.parametrize("lora_scale", [1.0, 4.0])
def test_low_rank_init_balanced_with_spectral_scale(lora_scale):
    for m, n in ((32, 128), (128, 32)):
        layer = LowRankLinear(m, n, 4, lora_scale=lora_scale, rngs=nnx.Rngs(3))
        a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
        gain = math.sqrt(n / m)
        # Equal spectral norms, sqrt(gain / c), and flat spectra (semi-orthogonal).
        for f in (a, b):
            np.testing.assert_allclose(
                np.linalg.svd(f, compute_uv=False),
                math.sqrt(gain / lora_scale),
                rtol=1e-5,
            )
        s = np.linalg.svd(lora_scale * a @ b, compute_uv=False)
        np.testing.assert_allclose(s[:4], gain, rtol=1e-5)
        np.testing.assert_allclose(s[4:], 0.0, atol=1e-5)
        x = np.random.default_rng(0).normal(size=(2, 5, m)).astype(np.float32)
        np.testing.assert_allclose(layer(x), lora_scale * (x @ a) @ b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [4, None])
def test_causal_future_tokens_do_not_change_past_logits(rank):
    model = _model(rank=rank)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, VOCAB)
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 1) % VOCAB)
    # A zero head would make every logit zero: give it weights first.
    model.head.kernel[...] = jax.random.normal(jax.random.key(2), model.head.kernel.shape)
    before, after = _apply(model, tokens), _apply(model, changed)
    np.testing.assert_allclose(before[:, :9], after[:, :9], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(before[:, 9:] - after[:, 9:]).max()) > 1e-3


def test_bad_arguments_raise():
    model = _model()
    with pytest.raises(ValueError, match="seq_len"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="multiple of `heads`"):
        _model(width=30)
    for bad in (dict(rank=0), dict(depth=0), dict(width=32.0), dict(rank=True)):
        with pytest.raises(ValueError, match="positive int"):
            _model(**bad)
    with pytest.raises(ValueError, match="lora_scale"):
        LowRankLinear(4, 4, 2, lora_scale=0.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "rank,make_tx",
    [
        (4, lambda: lora_muon(0.05, adam_learning_rate=1e-2)),
        (None, lambda: optax.adamw(1e-2)),
    ],
    ids=["lora_muon", "dense_adamw"],
)
def test_a_few_steps_reduce_the_loss(rank, make_tx):
    model = _model(rank=rank, depth=1)
    # A fixed periodic sequence: learnable, so the loss must fall quickly.
    seq = jnp.tile(jnp.arange(VOCAB), 4)
    batch = (
        jnp.stack([seq[i : i + 16] for i in range(4)]),
        jnp.stack([seq[i + 1 : i + 17] for i in range(4)]),
    )
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(25)]
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=1e-6)  # zero head: uniform
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_generate_extends_the_prompt_greedily_and_deterministically():
    model = _model()
    model.head.kernel[...] = jax.random.normal(jax.random.key(2), model.head.kernel.shape)
    prompt = jnp.array([1, 2, 3])
    out = generate(model, prompt, 20, jax.random.key(0), temperature=0.0)
    assert out.shape == (23,) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:3], prompt)
    # Greedy decoding: token t is the argmax of the model on the last seq_len = 16
    # tokens before it. For t <= 16 one causal pass over out[:16] gives them all; after
    # that the window slides: out[t-16:t], batched.
    windows = jnp.stack([out[:16]] + [out[t - 16 : t] for t in range(17, 23)])
    greedy = jnp.argmax(_apply(model, windows), axis=-1)
    np.testing.assert_array_equal(out[3:17], greedy[0, 2:16])
    np.testing.assert_array_equal(out[17:], greedy[1:, -1])
    sampled = generate(model, prompt, 20, jax.random.key(5))
    np.testing.assert_array_equal(sampled, generate(model, prompt, 20, jax.random.key(5)))
    assert not np.array_equal(sampled, generate(model, prompt, 20, jax.random.key(6)))
    assert int(sampled.min()) >= 0 and int(sampled.max()) < VOCAB
    with pytest.raises(ValueError, match="prompt"):
        generate(model, jnp.array([], jnp.int32), 3, jax.random.key(0))
