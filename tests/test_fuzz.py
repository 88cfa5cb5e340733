"""The fuzz of ``tests/fuzz.py`` in the default suite: 12,600 pairs in three dtypes.

Golden values are not needed: the product step has a known size. Each tangent term
of ``c · a @ b`` moves by exactly ``η/2`` in spectral norm for full-rank factors in
range, never by more, and a zero factor's partner does not move.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import fuzz

# Upper bound on each term / (η/2), per param dtype (the budget).
TOLERANCE = {"float32": 1e-2, "bfloat16": 1e-1, "float16": 1e-1}


@pytest.fixture(scope="module")
def results():
    return fuzz.run_fuzz(pairs_per_group=210, seed=0)


def test_fuzz_covers_ten_thousand_pairs(results):
    assert sum(r.finite.size for r in results.values()) >= 10_000


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_no_update_is_non_finite(results, dtype):
    assert results[dtype].finite.all(), int((~results[dtype].finite).sum())


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_every_term_within_its_budget(results, dtype):
    r = results[dtype]
    worst = max(r.term_a.max(), r.term_b.max())
    assert worst <= 1 + TOLERANCE[dtype], worst


def test_every_defined_float32_term_is_exactly_half_the_budget(results):
    r = results["float32"]
    assert r.defined.sum() > 1_500
    dev = np.abs(np.concatenate([r.term_a[r.defined], r.term_b[r.defined]]) - 1)
    assert dev.max() <= 1e-2, dev.max()


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_partner_of_a_zero_factor_does_not_move(results, dtype):
    assert results[dtype].partner_of_zero.all()
