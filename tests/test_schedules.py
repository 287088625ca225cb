import math

import numpy as np
import pytest

import stochastic_depth_jax as sdj


def test_linear_decay_uses_paper_indexing():
    p = sdj.linear_decay(54, 0.5)
    assert p.shape == (54,)
    # l = 1 is just below 1; l = L is exactly p_L (paper Eq. 4, l = 1..L).
    assert p[0] == pytest.approx(1 - 0.5 / 54)
    assert p[-1] == 0.5
    assert np.all(np.diff(p) < 0)
    # Expected number of surviving blocks for ResNet-110 (paper: ~3L/4 = 40.5 -> 40.25).
    assert p.sum() == pytest.approx(40.25)


def test_uniform_and_lookup():
    assert np.all(sdj.uniform(5, 0.8) == 0.8)
    np.testing.assert_array_equal(sdj.survival_probabilities("linear", 4, 0.5),
                                  sdj.linear_decay(4, 0.5))
    assert np.all(sdj.linear_decay(7, 1.0) == 1.0)


@pytest.mark.parametrize("p_l", [0.0, 1.5, -0.1, math.nan, "half", None])
def test_bad_final_survival_prob(p_l):
    with pytest.raises(ValueError, match="final_survival_prob"):
        sdj.linear_decay(10, p_l)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_num_blocks(n):
    with pytest.raises(ValueError, match="num_blocks"):
        sdj.uniform(n, 0.5)


def test_unknown_rule_lists_valid():
    with pytest.raises(ValueError, match="linear"):
        sdj.survival_probabilities("exponential", 10, 0.5)


@pytest.mark.parametrize("p_l", [np.array(True), np.bool_(True), np.array("0.5"),
                                 np.complex64(0.5)], ids=repr)
def test_final_survival_prob_that_is_a_bool_array_or_text_is_refused(p_l):
    # float() read np.array(True) as 1.0: constant depth, silently.
    with pytest.raises(ValueError, match=r"^final_survival_prob must be a number in \(0, 1\]"):
        sdj.linear_decay(10, p_l)


@pytest.mark.parametrize("p_l", [np.array([0.5]), np.full((1, 1), 0.5)], ids=repr)
def test_final_survival_prob_that_is_an_array_names_its_shape(p_l):
    with pytest.raises(ValueError, match=r"^final_survival_prob must be one number, p_L .*, "
                                         r"got an array of shape \(1(, 1)?,?\)"):
        sdj.uniform(10, p_l)


def test_final_survival_prob_as_a_numpy_or_jax_scalar_works():
    import jax.numpy as jnp
    for p_l in (np.float32(0.5), np.array(0.5), jnp.float32(0.5), jnp.bfloat16(0.5)):
        np.testing.assert_array_equal(sdj.linear_decay(4, p_l), [0.875, 0.75, 0.625, 0.5])
