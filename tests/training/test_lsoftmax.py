"""LSoftmaxLinear against a slow float64 reference written from the paper's equations, against
pytorch-metric-learning's LargeMarginSoftmaxLoss, and at the edge cases (theta = 0, pi, j pi/m, zero x)."""

import math

import pytest
import torch
import torch.nn.functional as F

from training.lsoftmax import (
    CaffeBetaSchedule,
    ConstantBetaSchedule,
    ExponentialBetaSchedule,
    LSoftmaxLinear,
    build_beta_schedule,
    chebyshev_cos_multiple,
)


def reference_logits(x, weight, target, margin, beta):
    """Per-sample float64 loop over Eq. (4)-(6): theta by acos, k by floor, cos(m theta) by math.cos."""
    x, weight = x.double(), weight.double()
    out = x @ weight.T
    for i in range(x.shape[0]):
        y = int(target[i])
        w = weight[y]
        norm = float(w.norm() * x[i].norm())
        if norm == 0.0:
            f = 0.0
        else:
            cos_t = max(-1.0, min(1.0, float(w @ x[i]) / norm))
            theta = math.acos(cos_t)
            k = min(int(math.floor(theta * margin / math.pi)), margin - 1)
            psi = (-1) ** k * math.cos(margin * theta) - 2 * k
            f = norm * psi
        out[i, y] = (f + beta * float(w @ x[i])) / (1.0 + beta)
    return out


def make_layer(d, c, m, beta=0.0, seed=0):
    torch.manual_seed(seed)
    layer = LSoftmaxLinear(d, c, m).train()
    layer.beta.fill_(beta)
    return layer


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("beta", [0.0, 0.5, 100.0])
def test_matches_float64_reference(margin, beta):
    layer = make_layer(16, 10, margin, beta).double()
    torch.manual_seed(1)
    x = torch.randn(64, 16, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (64,))
    got = layer(x, y)
    want = reference_logits(x, layer.weight.detach(), y, margin, beta)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def autograd_reference(x, weight, target, margin, beta):
    """Eq. (4)-(6) in float64 by plain autograd (acos, floor, cos(m theta)), for values and gradients."""
    logits = x @ weight.T
    w = weight[target]
    p = (w * x).sum(1)
    n = w.norm(dim=1) * x.norm(dim=1)
    theta = torch.acos((p / n).clamp(-1.0, 1.0))
    k = torch.floor(theta.detach() * margin / math.pi).clamp(max=margin - 1)
    psi = torch.pow(-1.0, k) * torch.cos(margin * theta) - 2.0 * k
    out_y = (n * psi + beta * p) / (1.0 + beta)
    return logits.scatter(1, target.view(-1, 1), out_y.view(-1, 1))


def _features_at_angles(weight, target, angles, radii):
    """x_i at angle angles[i] from W_{y_i} (in the plane of W_{y_i} and a fixed orthogonal direction)."""
    w_hat = weight[target] / weight[target].norm(dim=1, keepdim=True)
    u = torch.ones_like(w_hat)
    u = u - (u * w_hat).sum(1, keepdim=True) * w_hat
    u = u / u.norm(dim=1, keepdim=True)
    return radii.view(-1, 1) * (torch.cos(angles).view(-1, 1) * w_hat + torch.sin(angles).view(-1, 1) * u)


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("beta", [0.0, 0.5, 100.0])
def test_values_and_gradients_match_autograd_reference_at_bucket_boundaries(margin, beta):
    """At theta = j pi/m (the k-bucket boundaries), just either side of them, and at random angles, the layer's
    logits and its hand-written gradients (x and W, under cross-entropy) match autograd through the paper's
    formula in float64. theta = 0 and pi are left out: acos has no finite gradient there."""
    torch.manual_seed(4)
    layer = make_layer(6, 5, margin, beta).double()
    boundaries = [j * math.pi / margin for j in range(1, margin)]
    angles = [a + d for a in boundaries for d in (0.0, 1e-6, -1e-6)] + [0.1, 1.0, 2.0, 3.0]
    angles = torch.tensor(angles, dtype=torch.float64).repeat(3)
    y = torch.randint(0, 5, (len(angles),))
    radii = torch.rand(len(angles), dtype=torch.float64) * 5 + 0.1
    x = _features_at_angles(layer.weight.detach(), y, angles, radii)
    results = []
    for fn in (lambda x_, w_: _functional(layer, x_, w_, y), lambda x_, w_: autograd_reference(x_, w_, y, margin, beta)):
        xi = x.clone().requires_grad_()
        wi = layer.weight.detach().clone().requires_grad_()
        out = fn(xi, wi)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), xi.grad, wi.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
def test_loss_matches_pytorch_metric_learning(margin):
    from pytorch_metric_learning.losses import LargeMarginSoftmaxLoss

    layer = make_layer(32, 10, margin, beta=0.0)
    pml = LargeMarginSoftmaxLoss(num_classes=10, embedding_size=32, margin=margin, scale=1)
    with torch.no_grad():
        pml.W.copy_(layer.weight.T)  # PML stores W as [embedding, classes]
    torch.manual_seed(2)
    x = torch.randn(128, 32)
    y = torch.randint(0, 10, (128,))
    ours = F.cross_entropy(layer(x, y), y)
    theirs = pml(x, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.7, 250.0])
def test_beta_as_a_device_tensor_gives_what_the_float_gives(beta):
    """On a GPU the layer passes beta as a 0-dim tensor (no read-back per step); same values and gradients."""
    from training.lsoftmax import _LSoftmaxFunction

    torch.manual_seed(3)
    layer = LSoftmaxLinear(6, 5, margin=3)
    x = torch.randn(8, 6)
    target = torch.randint(0, 5, (8,))
    results = []
    for b in (beta, torch.tensor(beta)):
        xi, wi = x.clone().requires_grad_(), layer.weight.detach().clone().requires_grad_()
        out = _LSoftmaxFunction.apply(xi, wi, target, b, layer)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad, wi.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_margin_one_beta_zero_is_softmax_cross_entropy():
    layer = make_layer(8, 10, 1, beta=0.0)
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    assert torch.equal(layer(x, y), x @ layer.weight.T)
    assert torch.equal(F.cross_entropy(layer(x, y), y), F.cross_entropy(F.linear(x, layer.weight), y))


@pytest.mark.parametrize("margin", [2, 4])
def test_eval_and_no_target_are_plain_linear(margin):
    layer = make_layer(8, 10, margin, beta=0.0)
    x, y = torch.randn(16, 8), torch.randint(0, 10, (16,))
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    layer.eval()
    assert torch.equal(layer(x, y), F.linear(x, layer.weight))


def test_margin_only_changes_target_logit_and_lowers_it():
    layer = make_layer(8, 10, 4, beta=0.0)
    x, y = torch.randn(64, 8), torch.randint(0, 10, (64,))
    plain, margin = F.linear(x, layer.weight), layer(x, y)
    mask = F.one_hot(y, 10).bool()
    assert torch.equal(margin[~mask], plain[~mask])
    assert torch.all(margin[mask] <= plain[mask] + 1e-5)


@pytest.mark.parametrize("margin", [2, 3, 4])
def test_gradcheck_float64(margin):
    layer = make_layer(6, 5, margin, beta=0.3).double()
    torch.manual_seed(3)
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    w = layer.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, w_: _functional(layer, x_, w_, y), (x, w))


def _functional(layer, x, w, y):
    """The layer's forward with its weight swapped for `w`, so gradcheck can differentiate both."""
    saved = layer.weight
    del layer.weight
    layer.weight = w
    try:
        return layer(x, y)
    finally:
        del layer.weight
        layer.weight = saved


def _edge_inputs(margin):
    """2-D features at theta = 0, pi, j*pi/m against W_y = (1, 0), plus a zero vector and huge norms."""
    angles = [0.0, math.pi] + [j * math.pi / margin for j in range(1, margin)]
    xs = [[math.cos(a), math.sin(a)] for a in angles] + [[0.0, 0.0], [1e6, 1e-3], [-3e6, 1.0], [1e-30, 0.0]]
    return torch.tensor(xs, dtype=torch.float32)


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("beta", [0.0, 10.0])
def test_outputs_and_gradients_finite_at_edges(margin, beta):
    layer = make_layer(2, 3, margin, beta)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]))
    x = _edge_inputs(margin).requires_grad_()
    y = torch.zeros(len(x), dtype=torch.long)
    out = layer(x, y)
    F.cross_entropy(out, y).backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5])
def test_psi_monotone_below_cos_and_in_range(margin):
    layer = LSoftmaxLinear(2, 2, margin).double()
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    psi = layer.psi(torch.cos(theta))
    assert torch.all(psi[1:] <= psi[:-1] + 1e-12), "psi must decrease on [0, pi]"
    assert torch.all(psi <= torch.cos(theta) + 1e-12)
    assert psi.max() <= 1 + 1e-12 and psi.min() >= 1 - 2 * margin - 1e-12
    torch.testing.assert_close(psi[0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(psi[-1], torch.tensor(1.0 - 2 * margin, dtype=torch.float64))


@pytest.mark.parametrize("m", range(0, 8))
def test_chebyshev_is_cos_multiple_angle(m):
    theta = torch.linspace(0, math.pi, 101, dtype=torch.float64)
    torch.testing.assert_close(chebyshev_cos_multiple(torch.cos(theta), m), torch.cos(m * theta))


def test_state_dict_holds_beta_and_init_is_kaiming():
    torch.manual_seed(0)
    layer = LSoftmaxLinear(512, 1000, 3)
    assert set(layer.state_dict()) == {"weight", "beta"}
    assert layer.beta.dim() == 0 and layer.beta.dtype == torch.float32
    assert layer.weight.shape == (1000, 512)
    assert abs(layer.weight.std().item() - 1 / math.sqrt(512)) < 0.02 / math.sqrt(512) * 10
    layer.beta.fill_(7.0)
    other = LSoftmaxLinear(512, 1000, 3)
    other.load_state_dict(layer.state_dict())
    assert other.beta.item() == 7.0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bad_margin_rejected(bad):
    with pytest.raises(ValueError, match="margin"):
        LSoftmaxLinear(4, 3, bad)


def test_caffe_schedule_formula_steps_and_state():
    layer = LSoftmaxLinear(4, 3, 4)
    sched = CaffeBetaSchedule(layer)  # MNIST defaults: 1000, 2.5e-5, 35, 0
    assert layer.beta.item() == pytest.approx(1000.0)
    for _ in range(12000):
        sched.step()
    want = 1000.0 * (1 + 2.5e-5 * 12000) ** -35
    assert sched.current == pytest.approx(want) and layer.beta.item() == pytest.approx(want, rel=1e-6)
    other_layer = LSoftmaxLinear(4, 3, 4)
    restored = CaffeBetaSchedule(other_layer)
    restored.load_state_dict(sched.state_dict())
    assert restored.iteration == 12000 and other_layer.beta.item() == pytest.approx(want, rel=1e-6)
    floor = CaffeBetaSchedule(LSoftmaxLinear(4, 3, 4), beta_min=5.0)
    assert floor.value(10**7) == 5.0


def test_exponential_and_constant_schedules():
    layer = LSoftmaxLinear(4, 3, 2)
    sched = ExponentialBetaSchedule(layer)
    for _ in range(10):
        sched.step()
    assert layer.beta.item() == pytest.approx(100 * 0.99**10, rel=1e-6)
    ConstantBetaSchedule(layer, 0.0)
    assert layer.beta.item() == 0.0
    with pytest.raises(ValueError, match="unknown beta schedule"):
        build_beta_schedule("linear", layer)
