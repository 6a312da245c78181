"""Coverage metric (improved precision / recall, Kynkäänniemi et al. 2019) and the boundary filter."""

import torch

from pfdiff.evaluation.coverage import class_coverage, knn_radii, precision_recall
from pfdiff.report import group_mean
from pfdiff.longtail.filtering import MahalanobisScorer, boundary_filter, margins


def test_knn_radii_hand_values():
    pts = torch.tensor([[0.0], [1.0], [3.0]])
    torch.testing.assert_close(knn_radii(pts, 1), torch.tensor([1.0, 1.0, 2.0]))
    torch.testing.assert_close(knn_radii(pts, 5), torch.tensor([3.0, 2.0, 3.0]))  # k ≥ n − 1: farthest point
    assert knn_radii(pts[:1], 3).tolist() == [0.0]


def test_precision_recall_separates_copying_from_covering():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 2, generator=g)
    same = torch.randn(200, 2, generator=g)
    p, r = precision_recall(real, same, k=3)
    assert p > 0.8 and r > 0.8  # two samples of one distribution cover each other
    far = same + 10.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # a generator that collapses onto one blob of the real distribution: precise, but recall low
    blob = 0.05 * torch.randn(200, 2, generator=g) + torch.tensor([1.0, 1.0])
    p, r = precision_recall(real, blob, k=3)
    assert p > 0.9 and r < 0.2
    assert precision_recall(real, real[:0]) == (None, None)


def test_class_coverage_reports_the_training_reference():
    g = torch.Generator().manual_seed(1)
    z_val = torch.cat([torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g) + 8])
    y_val = torch.tensor([0] * 30 + [1] * 30)
    z_train, y_train = z_val[[0, 30]] + 0.01, torch.tensor([0, 1])  # one training example per class
    z_fake = torch.cat([torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g) + 8])
    y_fake = torch.tensor([0] * 50 + [1] * 50)
    cov = class_coverage(z_val, y_val.numpy(), z_fake, y_fake, z_train, y_train, 3, k=3)
    assert cov["generated"] == [50, 50, 0] and cov["recall"][2] is None
    assert all(cov["recall"][c] > cov["recall_train"][c] for c in (0, 1))  # beyond the training points
    assert group_mean(cov["recall"], [0, 1, 2]) == (cov["recall"][0] + cov["recall"][1]) / 2


def test_boundary_filter_keeps_in_distribution_small_margins():
    g = torch.Generator().manual_seed(2)
    z = torch.cat([torch.randn(100, 2, generator=g) + torch.tensor([-3.0, 0.0]),
                   torch.randn(100, 2, generator=g) + torch.tensor([3.0, 0.0])])
    y = torch.tensor([0] * 100 + [1] * 100)
    clf = torch.nn.Linear(2, 2)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        clf.bias.zero_()
    scorer = MahalanobisScorer(z, y, 2)
    z_p = torch.tensor([[-1.2, 0.0], [-3.0, 0.0], [-50.0, 0.0], [-1.0, 0.0], [-4.0, 0.0]])
    y_p = torch.zeros(5, dtype=torch.long)
    res = boundary_filter(scorer, clf, z_p, y_p, 2, quantile=0.95, boundary_quantile=0.5)
    m = margins(clf, z_p, y_p)
    assert m[0] < m[1]  # nearer the boundary: smaller margin
    assert not res.keep[2]  # far out of distribution: rejected although its margin is huge
    kept = res.keep.nonzero().flatten().tolist()
    assert kept == [0, 3]  # the deep-in-blob samples (margins 6, 8) are dropped
    assert res.kept_per_class == [len(kept), 0] and not res.no_generation
