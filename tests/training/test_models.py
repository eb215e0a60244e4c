"""The nets: shapes per name, argument checks, eval logits = W . embed(x), He init, and the paper's
Table 1 structure (docs/architecture.md §6)."""

import math

import pytest
import torch
from torch import nn

from training.lsoftmax import LSoftmaxLinear
from training.models import MODEL_NAMES, build_model, embedding_dim


@pytest.mark.parametrize("name, dim", [("paper", 256), ("vis", 2), ("fast", 128)])
def test_logits_and_embedding_shapes(name, dim):
    torch.manual_seed(0)
    net = build_model(name, margin=3)
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    assert embedding_dim(name) == dim
    assert net.train()(x, y).shape == (5, 10)
    net.eval()
    assert net(x).shape == (5, 10)
    assert net.embed(x).shape == (5, dim)
    assert isinstance(net.head, LSoftmaxLinear) and net.head.weight.shape == (10, dim)
    assert net.head.margin == 3


def test_unknown_name_and_bad_margin_raise_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*paper, vis, fast"):
        build_model("resnet", 2)
    for margin in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="margin must be an integer >= 1"):
            build_model("fast", margin)
    assert set(MODEL_NAMES) == {"paper", "vis", "fast"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_logits_are_w_times_embedding(name):
    """The served graph is backbone + plain Linear(W): in eval (and without a target) there is no margin."""
    torch.manual_seed(1)
    net = build_model(name, margin=4).eval()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    with torch.no_grad():
        expected = net.embed(x) @ net.head.weight.T
        torch.testing.assert_close(net(x), expected)
        torch.testing.assert_close(net(x, y), expected)  # eval ignores the target
        net.train()
        net.head.beta.fill_(0.0)
        assert not torch.allclose(net(x, y), net.embed(x) @ net.head.weight.T)  # training applies the margin


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_he_init(name):
    """Conv/FC weights ~ N(0, 2 / ((1 + a^2) fan_in)) with PReLU's a = 0.25, zero biases."""
    torch.manual_seed(2)
    net = build_model(name, margin=2)
    layers = [m for m in net.backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers
    for layer in layers:
        w = layer.weight
        fan_in = w[0].numel()
        expected = math.sqrt(2.0 / ((1 + 0.25 ** 2) * fan_in))
        tolerance = 4.0 / math.sqrt(w.numel())  # relative std error of a sample std is ~ 1/sqrt(2n)
        assert abs(w.std().item() / expected - 1) < max(tolerance, 0.05), (layer, w.std().item(), expected)
        assert abs(w.mean().item()) < 4 * expected / math.sqrt(w.numel())
        if layer.bias is not None:
            assert torch.count_nonzero(layer.bias) == 0


def test_paper_net_matches_table_1():
    """conv 3x3/64, then three stages of [3x3/64] x 3 + 2x2 max-pool, FC 576 -> 256; PReLU + BatchNorm."""
    net = build_model("paper", margin=4)
    convs = [m for m in net.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10
    assert all(c.kernel_size == (3, 3) and c.out_channels == 64 and c.padding == (1, 1) for c in convs)
    assert convs[0].in_channels == 1 and all(c.in_channels == 64 for c in convs[1:])
    pools = [m for m in net.backbone.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 2 for p in pools)
    fcs = [m for m in net.backbone.modules() if isinstance(m, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in fcs] == [(576, 256)]
    assert sum(isinstance(m, nn.PReLU) for m in net.modules()) == 10
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 10
    assert not any(isinstance(m, (nn.Dropout, nn.ReLU)) for m in net.modules())
    # Pools sit after convs 4, 7 and 10: three stages of three after the first conv.
    kinds = [type(m).__name__ for m in net.backbone if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    assert kinds == ["Conv2d"] + (["Conv2d"] * 3 + ["MaxPool2d"]) * 3


def test_vis_net_matches_figure_2():
    """Three stages of [5x5 conv, pad 2] x 2 with 32/64/128 channels + pool, then a 2-D feature."""
    net = build_model("vis", margin=2)
    convs = [m for m in net.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (5, 5) and c.padding == (2, 2) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    assert net.head.weight.shape == (10, 2)
