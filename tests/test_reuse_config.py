"""ReuseConfig validation and coercion; ReuseState's hash-parameter cache."""
import numpy as np
import pytest

from minireuse.reuse import ReuseConfig, ReuseState


@pytest.mark.parametrize("field, value", [
    ("L", 0), ("L", 2.5), ("H", 0), ("H", 65), ("H", True), ("family", "planes"),
    ("dx_mode", "approx"), ("enabled", 1), ("shared_planes", "yes"), ("pixel_aligned", "always"),
    ("seed", -1), ("measure_error", None), ("impl", "gpu"),
])
def test_bad_values_name_the_field_and_the_value(field, value):
    with pytest.raises(ValueError, match=rf"ReuseConfig\.{field}: got {value!r}"):
        ReuseConfig(**{field: value})


def test_coerce_and_replace():
    assert ReuseConfig.coerce(True) == ReuseConfig()
    c = ReuseConfig.coerce({"L": 8, "H": 20, "family": "origin"})
    assert (c.L, c.H, c.family, c.dx_mode) == (8, 20, "origin", "exact")
    assert ReuseConfig.coerce(c) is c
    assert c.replace(H=4).H == 4 and c.H == 20
    with pytest.raises(ValueError, match="unknown field"):
        ReuseConfig.coerce({"bits": 3})
    with pytest.raises(ValueError, match="expected a ReuseConfig"):
        ReuseConfig.coerce("fast")
    with pytest.raises(ValueError, match="ReuseConfig.H"):
        c.replace(H=65)


def test_hash_params_are_cached_per_key():
    state = ReuseState()
    a = state.hash_params(8, 12, 3, "offset", 0, True, np, np.float32)
    assert a is state.hash_params(8, 12, 3, "offset", 0, True, np, np.float32)
    assert a[0].dtype == np.float32 and a[0].shape == (1, 8, 12) and a[1].shape == (1, 12)
    b = state.hash_params(8, 12, 3, "offset", 0, False, np, np.float32)
    assert b[0].shape == (3, 8, 12)
    np.testing.assert_array_equal(a[0][0], b[0][0])        # same generator, same first draws
