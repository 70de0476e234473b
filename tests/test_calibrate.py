"""asynctrain.calibrate: the data-driven initialisation reaches its target rate in
every layer, changes only the scale of each weight layer, and refuses bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asynctrain import AsyncSNN, SimConfig
from asynctrain.calibrate import calibrate_rates, layer_rates


def _snn(scale: float = 1.0, theta=0.3) -> AsyncSNN:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 24, bias=False), nn.Linear(24, 16, bias=False),
                        nn.Linear(16, 5, bias=False))
    with torch.no_grad():
        for lin in net:
            lin.weight.mul_(scale)
    return AsyncSNN(net, SimConfig(policy="RS", tau=20.0, dt=10.0, theta=theta))


def _frames(T: int = 6, B: int = 64) -> torch.Tensor:
    return (torch.rand(T, B, 40, generator=torch.Generator().manual_seed(1)) < 0.15).float()


@pytest.mark.parametrize("scale", [0.3, 3.0])  # silent and saturated starts
def test_every_layer_reaches_its_target(scale):
    snn, x = _snn(scale), _frames()
    before = [lin.weight.clone() for lin in snn.net]
    scales = calibrate_rates(snn, x, rate=0.15, output_rate=0.3)
    rates = layer_rates(snn, x)
    assert rates[:2] == pytest.approx([0.15, 0.15], abs=0.02)
    assert rates[2] == pytest.approx(0.3, abs=0.04)
    for w0, lin, s in zip(before, snn.net, scales):  # only the scale of each layer changed
        torch.testing.assert_close(lin.weight, w0 * s)
    assert snn.cfg.policy == "RS"  # the model's own config is untouched


def test_per_neuron_theta_and_deterministic():
    n = 24 + 16 + 5
    a, b = _snn(theta=torch.full((n,), 0.3)), _snn()
    x = _frames()
    assert calibrate_rates(a, x, 0.1) == pytest.approx(calibrate_rates(b, x, 0.1))
    assert layer_rates(a, x) == layer_rates(b, x)


def test_bad_input_named():
    snn, x = _snn(), _frames()
    with pytest.raises(ValueError, match="rate must lie in .* got 1.5"):
        calibrate_rates(snn, x, rate=1.5)
    with pytest.raises(ValueError, match="output_rate must lie in .* got 0"):
        calibrate_rates(snn, x, output_rate=0)
    conv = AsyncSNN(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Flatten(),
                                  nn.Linear(2 * 16, 5, bias=False)), SimConfig(),
                    input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="1 nn.Linear among 2 weight layers"):
        calibrate_rates(conv, torch.zeros(2, 3, 16))
