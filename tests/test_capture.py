"""Capture and the public API: modes, nested outputs, bad input, re-export, what the eval forward computes for
nothing."""

import pytest
import torch
from torch import nn

import fusers
from fusers.capture import describe_unused, drop_dead_code, unused_parameters
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


class AuxHead(nn.Module):
    """IAuxDetect's shape in miniature: the eval forward also runs an auxiliary branch (a conv-BN-act layer and
    a 1x1 head, as the W6 configs' layers 118-121 and ``m2``) on its own input list, then returns the lead
    head only."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.aux = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                 nn.LeakyReLU(0.1, inplace=True) if inplace else nn.SiLU())
        self.m = nn.Conv2d(4, 6, 1)
        self.m2 = nn.Conv2d(4, 6, 1)
        self.register_buffer("anchors", torch.ones(3, 2))  # a training-only buffer, as IDetect's

    def forward(self, x):
        y = self.stem(x)
        x = [y, self.aux(y)]
        x[0] = self.m(x[0])
        x[1] = self.m2(x[1]).permute(0, 2, 3, 1).contiguous()  # computed, never returned in eval
        out = x[0].sigmoid()
        out[:, 0:2] = out[:, 0:2] * 2.0  # an in-place write into a live tensor: must stay
        return out if not self.training else x


@pytest.mark.parametrize("inplace", [False, True], ids=["silu", "inplace_leaky_relu"])
def test_dead_branch_is_named_and_dropped(inplace):
    model = randomize_bn(AuxHead(inplace))
    x = torch.randn(1, 3, 8, 8)
    gm = fusers.capture(model, (x,))
    unused = unused_parameters(model, gm)
    aux = ["aux.0.weight", "aux.1.weight", "aux.1.bias", "aux.1.running_mean", "aux.1.running_var",
           "aux.1.num_batches_tracked", "m2.weight", "m2.bias"]
    assert unused == ["anchors"] + aux  # stem.1.num_batches_tracked is not: the rest of stem.1 is read
    assert describe_unused(model, unused) == ["anchors (buffer of AuxHead)", "aux (Sequential in AuxHead, 6 tensors)",
                                              "m2 (Conv2d, 2 tensors)"]
    ep = torch.export.export(model, (x,), strict=False)
    assert unused_parameters(model, ep) == unused
    with torch.no_grad():
        ref = model(x)
        dropped = drop_dead_code(gm)
        assert dropped["conv2d"] == 2 and dropped["permute"] == 1 and "copy_" not in dropped, dropped
        torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)
    deploy = fusers.reparameterize(model, (x,))
    report = deploy.reparam_report
    assert report.ops_before["conv2d"] == 4 and report.ops_after["conv2d"] == 2, report.summary()
    assert not any(name.startswith(("aux", "m2")) for name, _ in deploy.named_parameters())
    assert report.unused == unused and report.dead_ops == dropped
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), ref, rtol=1e-5, atol=1e-6)


class Counting(nn.Module):
    """Writes into module state and into a fresh tensor it returns: both writes are live."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls.add_(1)
        y = torch.zeros_like(x)
        y[:, :1] = x[:, :1]
        return y + 1


def test_writes_into_state_and_live_tensors_are_not_dead():
    gm = fusers.capture(Counting(), (torch.randn(2, 3),))
    assert drop_dead_code(gm) == {}
    assert unused_parameters(Counting(), gm) == []
