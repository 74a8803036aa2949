"""A PyTorch user's habits against the functional API: where the call would silently mean something
else, or fails, the error names the gpuloss spelling (docs/api.md §5)."""
from __future__ import annotations

import numpy as np
import pytest

import gpuloss as gl

from .cases import LOSSES


def test_class_dim_one_layout_suggests_axis_1(rng):
    x = rng.standard_normal((4, 5, 6))
    y = rng.integers(0, 5, (4, 6))
    with pytest.raises(ValueError, match=r"pass axis=1"):
        gl.softmax_cross_entropy(x, y)
    assert np.isfinite(gl.softmax_cross_entropy(x, y, axis=1))   # the hint makes the call valid


def test_per_class_weight_suggests_class_weight(rng):
    x = rng.standard_normal((4, 5))
    y = rng.integers(0, 5, 4)
    with pytest.raises(ValueError, match=r"for PyTorch's per-class weight pass class_weight="):
        gl.softmax_cross_entropy(x, y, weight=np.ones(5))
    assert np.isfinite(gl.softmax_cross_entropy(x, y, class_weight=np.ones(5)))


def test_shape_errors_without_a_torch_reading_carry_no_hint(rng):
    with pytest.raises(ValueError) as info:
        gl.softmax_cross_entropy(rng.standard_normal((4, 5)), rng.integers(0, 5, 3))
    assert "axis=1" not in str(info.value) and "class_weight" not in str(info.value)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("key,spelling", [("dim", "axis="), ("size_average", "reduction="), ("reduce", "reduction=")])
def test_torch_keywords_name_our_spelling(name, key, spelling, rng):
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{key}'; gpuloss spells it {spelling}"):
        getattr(gl, name)(rng.standard_normal((2, 3)), rng.standard_normal((2, 3)), **{key: 1})


def test_unknown_keywords_stay_plain_type_errors(rng):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'colour'$"):
        gl.huber(np.ones(2), np.ones(2), colour=1)
