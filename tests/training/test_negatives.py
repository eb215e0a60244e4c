"""The training negatives (training.negatives) and their loss and stream (training.outlier_exposure)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import negatives as neg
from training.models import build_model
from training.outlier_exposure import NegativeStream, pool_size, uniform_target_loss, POOL_MAX


def _digits(n=60, seed=0):
    """Stand-in digits: strokes of two classes (a bar and a ring), framed as MNIST."""
    rng = np.random.default_rng(seed)
    out, labels = np.zeros((n, 1, 28, 28), np.uint8), np.arange(n) % 2
    ys, xs = np.mgrid[0:28, 0:28]
    for i in range(n):
        if labels[i] == 0:
            ink = (np.abs(xs - 14 - rng.integers(-2, 3)) < 2) & (np.abs(ys - 14) < 10)
        else:
            r = np.hypot(xs - 14, ys - 14)
            ink = (r > 6) & (r < 9)
        out[i, 0] = ink * 255
    return out, labels


def test_the_pool_is_deterministic_for_a_seed_and_differs_between_seeds():
    x, y = _digits()
    a = neg.negative_images(60, 3, x, y)
    assert a.shape == (60, 1, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, neg.negative_images(60, 3, x, y))
    assert not np.array_equal(a, neg.negative_images(60, 4, x, y))


def test_every_negative_is_framed_as_an_mnist_digit():
    x, y = _digits()
    images = neg.negative_images(90, 0, x, y)[:, 0].astype(np.float64)
    ink = images.sum(axis=(1, 2)) / 255
    assert ink.min() >= 10  # the graphs' no-ink floor is 10 white pixels: every negative must be above it
    for image in images:
        rows, cols = np.nonzero(image > 0.05 * image.max())
        assert 18 <= max(np.ptp(rows), np.ptp(cols)) + 1 <= 22  # longer side 20 px (resampling blurs one px)
        ys, xs = np.mgrid[0:28, 0:28]
        cy, cx = (ys * image).sum() / image.sum(), (xs * image).sum() / image.sum()
        assert abs(cy - 13.5) < 1.0 and abs(cx - 13.5) < 1.0


def test_each_family_takes_its_share_and_the_pool_is_shuffled(monkeypatch):
    def maker(value):
        return lambda n, rng, *digits: np.full((n, 1, 28, 28), value, np.uint8)

    for value, name in enumerate(("stroke_font_glyphs", "scribbles", "digit_fragments"), start=1):
        monkeypatch.setattr(neg, name, maker(value))
    x, y = _digits()
    pool = neg.negative_images(101, 0, x, y)[:, 0, 0, 0]
    assert [int((pool == v).sum()) for v in (1, 2, 3)] == [41, 30, 30]  # FAMILIES' shares, the rest to the first
    assert not np.array_equal(pool, np.sort(pool))


def test_the_stroke_fonts_hold_no_digit_no_digit_shaped_character_and_no_other_script():
    assert not set("0123456789") & set(neg.LATIN_CHARS)
    assert not neg.DIGIT_SHAPED & set(neg.LATIN_CHARS)
    for font in neg.LATIN_FONTS + neg.SYMBOL_FONTS:
        assert not any(script in font for script in ("greek", "cyril", "japan", "math", "timesg"))
    glyphs = neg._font_strokes("futural")
    assert set(glyphs) <= set(neg.LATIN_CHARS) and "C" in glyphs and "l" not in glyphs and "7" not in glyphs


def test_hard_negatives_come_from_the_digits_given_and_need_two_classes():
    x, y = _digits()
    fragments = neg.digit_fragments(9, np.random.default_rng(0), x, y)
    assert fragments.shape == (9, 1, 28, 28) and (fragments.reshape(9, -1).sum(1) > 0).all()
    with pytest.raises(ValueError, match="two classes"):
        neg.digit_fragments(3, np.random.default_rng(0), x[y == 0], y[y == 0])


def test_frame_like_mnist_of_an_empty_image_is_empty():
    assert not neg.frame_like_mnist(np.zeros((40, 40))).any()


def test_the_uniform_target_loss_is_zero_only_for_equal_logits_and_pulls_them_together():
    assert uniform_target_loss(torch.full((4, 10), 3.0)).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 2.0, 1.0]], requires_grad=True)
    loss = uniform_target_loss(logits)
    expected = F.cross_entropy(logits, torch.full((2, 3), 1 / 3)) - np.log(3)  # KL from the uniform target
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and loss.item() > 0
    loss.backward()
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1] < 0  # the largest logit goes down, the others up
    assert uniform_target_loss(torch.zeros((0, 10))).item() == 0.0


def test_the_stream_is_the_same_for_a_seed_and_epoch_and_ranks_take_disjoint_shares():
    pool = torch.arange(40, dtype=torch.uint8).reshape(40, 1, 1, 1).expand(40, 1, 28, 28).contiguous()

    def first_ids(stream, k=4):
        it = stream.batches()
        return [next(it)[:, 0, 0, 0] for _ in range(k)]

    a, b = NegativeStream(pool, 4, seed=1), NegativeStream(pool, 4, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(first_ids(a), first_ids(b)))
    b.epoch = 1
    assert not all(torch.equal(p, q) for p, q in zip(first_ids(a), first_ids(b)))
    r0, r1 = NegativeStream(pool, 5, 0, rank=0, world_size=2), NegativeStream(pool, 5, 0, rank=1, world_size=2)
    seen0 = set(torch.cat(first_ids(r0, 4)).tolist())
    seen1 = set(torch.cat(first_ids(r1, 4)).tolist())
    assert len(seen0) == 20 and len(seen1) == 20 and not seen0 & seen1
    with pytest.raises(ValueError):
        NegativeStream(pool[:3], 4, 0)
    assert pool_size(430, 32) == min(POOL_MAX, 430 * 32) and pool_size(2, 16) == 32


def test_negatives_after_the_labelled_rows_get_plain_logits_and_the_digits_their_margin():
    torch.manual_seed(0)
    net = build_model("fast", 4).train()
    net.head.beta.fill_(0.0)  # the margin alone, so the two kinds of rows differ
    x, labels = torch.randn(6, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    logits = net(x, labels)
    features = net.backbone(x).float()  # train-mode BN: the same batch gives the same features
    assert torch.allclose(logits[4:], F.linear(features[4:], net.head.weight), atol=1e-5)
    assert torch.allclose(logits[:4], net.head(features[:4], labels), atol=1e-5)
    assert not torch.allclose(logits[:4], F.linear(features[:4], net.head.weight), atol=1e-3)


def test_capture_like_softens_at_random_keeps_white_and_repeats_for_a_seed():
    from training.augment import capture_like
    from training.data import normalize

    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 6:22, 12:16] = 255  # a crisp bar
    x = normalize(images)
    a = capture_like(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, capture_like(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, capture_like(x, torch.Generator().manual_seed(2)))
    white = x.max()
    assert torch.allclose(a.amax(dim=(1, 2, 3)), white.expand(64), atol=1e-5)  # the brightest pixel stays white
    changed = (a - x).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert 0 < changed.sum() < 64  # about three in four are softened, the rest untouched
    edge = a[:, 0, 14, 11]  # just outside the bar: only a blur puts ink there
    assert (edge > x[:, 0, 14, 11] + 1e-3).any()
