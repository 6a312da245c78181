"""Semantic loss terms and AID/OOD filtering on cases with a known answer."""

import pytest
import torch

from pfdiff.longtail.filtering import MahalanobisScorer, aid_filter
from pfdiff.longtail.semantic import PrototypeBank, covariance_loss, prototype_loss, radius_loss


def test_proto_loss_zero_at_prototype_and_hand_value():
    mean = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    y = torch.tensor([0, 1])
    assert torch.equal(prototype_loss(mean[y], y, mean), torch.zeros(2))
    z = torch.tensor([[1.0, 4.0], [2.0, 4.0]])
    # ‖(0,2)‖²/2 = 2 ; ‖(3,4)‖²/2 = 12.5
    torch.testing.assert_close(prototype_loss(z, y, mean), torch.tensor([2.0, 12.5]))


def test_radius_loss_zero_on_the_sphere_and_hand_value():
    mean = torch.zeros(1, 2)
    r = torch.tensor([5.0])
    y = torch.zeros(3, dtype=torch.long)
    on = torch.tensor([[3.0, 4.0], [5.0, 0.0], [0.0, -5.0]])
    assert torch.allclose(radius_loss(on, y, mean, r), torch.zeros(3))
    torch.testing.assert_close(radius_loss(torch.tensor([[6.0, 8.0]]), y[:1], mean, r), torch.tensor([12.5]))


def test_cov_loss_hand_computed_and_skips_small_classes():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [9.0, 9.0]])
    y = torch.tensor([0, 0, 0, 0, 1])
    target = torch.zeros(2, 2, 2)
    # unbiased covariance of the 4 corners of a 2×2 square: diag(4/3, 4/3); ‖·‖_F = 4√2/3; /D=2
    loss, matched = covariance_loss(z, y, target, min_count=2)
    assert matched == 1  # class 1 has a single row: skipped
    torch.testing.assert_close(loss, torch.tensor(4 * 2 ** 0.5 / 3 / 2))
    target[0] = torch.eye(2) * 4 / 3
    assert covariance_loss(z, y, target, min_count=2)[0].abs() < 1e-6


def test_prototype_bank_ema_and_moments():
    bank = PrototypeBank(2, 2, momentum=0.5)
    bank.update(torch.tensor([[1.0, 1.0], [3.0, 3.0]]), torch.tensor([0, 0]))
    torch.testing.assert_close(bank.mean[0], torch.tensor([2.0, 2.0], dtype=torch.float64))  # first update copies
    bank.update(torch.tensor([[4.0, 4.0]]), torch.tensor([0]))
    torch.testing.assert_close(bank.mean[0], torch.tensor([3.0, 3.0], dtype=torch.float64))  # (1−.5)·2 + .5·4
    bank.update(torch.tensor([[0.0, 0.0]]), torch.tensor([0]), weight=0.0)  # zero-weight pseudo: no change
    torch.testing.assert_close(bank.mean[0], torch.tensor([3.0, 3.0], dtype=torch.float64))
    assert not bank.seen[1]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0])
    fitted = PrototypeBank(1, 3).fit(z, torch.zeros(len(z), dtype=torch.long))
    torch.testing.assert_close(torch.diagonal(fitted.covariance[0]).float(), torch.tensor([1.0, 4.0, 9.0]),
                               rtol=0.05, atol=0.05)
    torch.testing.assert_close(fitted.radius()[0].float(), torch.tensor(14.0).sqrt(), rtol=0.03, atol=0.0)


def test_mahalanobis_filter_keeps_in_distribution_and_drops_outliers():
    g = torch.Generator().manual_seed(1)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    y = torch.arange(2).repeat_interleave(500)
    z = means[y] + torch.randn(1000, 2, generator=g) * torch.tensor([1.0, 0.2])
    scorer = MahalanobisScorer(z, y, 2)
    good = means[y[:200]] + torch.randn(200, 2, generator=g) * torch.tensor([1.0, 0.2])
    bad = means[y[:200]] + torch.tensor([0.0, 3.0])  # 15 tied-σ off along the narrow axis
    res = aid_filter(scorer, torch.cat([good, bad]), torch.cat([y[:200], y[:200]]), 2, quantile=0.95)
    assert res.keep[:200].float().mean() > 0.85
    assert not res.keep[200:].any()
    assert res.generated_per_class == [400, 0] and res.kept_fraction_per_class[1] is None
    with pytest.raises(ValueError, match="quantile"):
        aid_filter(scorer, good, y[:200], 2, quantile=0.0)


def test_shrunk_covariance_and_scatter_about():
    from pfdiff.longtail.semantic import PrototypeBank

    bank = PrototypeBank(2, 2, momentum=1.0)
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    y = torch.tensor([0, 0, 1, 1])
    bank.fit(z, y)
    cov = bank.covariance  # class 0: diag(1, 0); class 1: diag(0, 9)
    torch.testing.assert_close(cov[0], torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)))
    pooled = (cov[0] + cov[1]) / 2
    shrunk = bank.shrunk_covariance(torch.tensor([2, 2]), prior_strength=2.0)
    torch.testing.assert_close(shrunk[0], (2 * cov[0] + 2 * pooled) / 4)
    # about its own mean the scatter is the covariance; about another centre it adds the offset's outer product
    torch.testing.assert_close(bank.scatter_about(bank.mean), cov)
    centre = bank.mean + torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(bank.scatter_about(centre)[0], cov[0] + torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)))
