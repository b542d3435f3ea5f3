"""Capture and the public API: modes, nested outputs, bad input, re-export."""

import pytest
import torch
from torch import nn

import fusers
from helpers import randomize_bn


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return {"features": y, "extra": [y.mean((2, 3)), (self.bn2(self.conv(x)) * 2,)]}


def test_nested_outputs_keep_their_structure_and_numbers():
    model = randomize_bn(Nested())
    x = torch.randn(2, 3, 8, 8)
    deploy = fusers.reparameterize(model, (x,))
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    assert set(out) == {"features", "extra"} and isinstance(out["extra"], list) and len(out["extra"][1]) == 1
    for a, b in zip(torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(out)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_input_model_is_untouched_and_train_mode_warns():
    model = randomize_bn(Nested()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="train mode"):
        deploy = fusers.reparameterize(model, torch.randn(1, 3, 8, 8))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "batch_norm" not in str(deploy.graph)


def test_deploy_module_exports_again():
    model = randomize_bn(Nested())
    x = torch.randn(1, 3, 8, 8)
    deploy = fusers.reparameterize(model, (x,))
    again = torch.export.export(deploy, (x,), strict=False).module()
    with torch.no_grad():
        torch.testing.assert_close(again(x)["features"], deploy(x)["features"])


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_uncapturable_model_names_the_operation():
    with pytest.raises(fusers.CaptureError, match=r"cannot capture DataDependent: .*if x.sum\(\) > 0"):
        fusers.reparameterize(DataDependent(), (torch.randn(1, 3),))


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(fusers.InputError, match=r"shape \(1, 1, 8, 8\).*3 channels"):
        fusers.reparameterize(Nested(), (torch.randn(1, 1, 8, 8),))
