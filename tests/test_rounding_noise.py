"""The fp32 tolerance floor: a model whose own float32 run is far from its exact function.

A deep EfficientNet with random weights is 3.6e-4 (relative) from its float64 run in float32; no float32
form of it can meet a fixed 1e-5 against the float32 reference. ``rounding_noise`` measures that distance
and a stage is held to ``NOISE_FACTOR`` times it; a well-conditioned model keeps the default.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deploy.verification import NOISE_FACTOR, _tolerance, rounding_noise


class Cancelling(nn.Module):
    """Adds and removes a large offset: float32 keeps about 7 digits of ``x + 3e3``, so ~2e-5 of ``x`` is lost."""

    def forward(self, x):
        return (x + 3e3) * 1.0001 - 3e3 * 1.0001


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def _noise(model, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).numpy()
    with torch.no_grad():
        ref = [model.eval()(torch.from_numpy(x)).numpy()]
    return rounding_noise(model, x, ref)


def test_an_ill_conditioned_model_raises_its_fp32_tolerance_and_says_why():
    noise = _noise(Cancelling(), (2, 3, 8, 8))
    assert 1e-6 < noise < 1e-3
    tol, note = _tolerance("fp32", None, 0.0, noise)
    assert tol.rtol == NOISE_FACTOR * noise
    assert note.startswith(f"tolerance {tol.rtol:.1e}: 3x the training model's own float32 rounding error")


def test_a_well_conditioned_model_keeps_the_default_tolerance():
    noise = _noise(Plain(), (2, 3, 8, 8))
    assert noise < 1e-6
    tol, note = _tolerance("fp32", None, 0.0, noise)
    assert tol.rtol == 1e-5 and note is None


def test_an_explicit_rtol_is_never_raised():
    tol, note = _tolerance("fp32", 1e-6, 0.0, 1e-3)
    assert tol.rtol == 1e-6 and note is None


def test_a_model_that_cannot_run_in_float64_gets_no_floor():
    class Float32Only(nn.Module):
        def forward(self, x):
            return x @ torch.ones(x.shape[-1], 2)  # a float32 constant made in forward: float64 input fails

    assert _noise(Float32Only(), (2, 4)) is None
    assert rounding_noise(Plain().half(), np.zeros((1, 3, 4, 4), np.float16), [np.zeros((1, 4, 2, 2))]) is None
