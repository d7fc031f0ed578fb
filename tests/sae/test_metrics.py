"""Every metric against a direct computation (DESIGN.md definitions)."""

import math

import torch

from sae import metrics


def _data(seed=0, n=64, d=8, f=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3 + 1
    x_hat = x + 0.5 * torch.randn(n, d, generator=g)
    latents = torch.relu(torch.randn(n, f, generator=g) - 1.0)
    latents[:, 0] = 0  # a dead latent
    latents[:, 1] = 1  # a dense latent
    return x, x_hat, latents


def test_reconstruction_metrics_match_direct_formulas():
    x, x_hat, _ = _data()
    assert torch.isclose(metrics.mse(x, x_hat), ((x_hat - x) ** 2).mean().double())
    direct_ve = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert torch.isclose(metrics.variance_explained(x, x_hat), direct_ve.double(), atol=1e-6)
    direct_cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()
    assert torch.isclose(metrics.cossim(x, x_hat), direct_cos.double(), atol=1e-6)
    direct_ratio = (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()
    assert torch.isclose(metrics.l2_ratio(x, x_hat), direct_ratio.double(), atol=1e-6)


def test_variance_explained_is_about_the_mean_not_zero():
    x = torch.randn(100, 4) + 100.0  # large mean: variance about zero would make any x_hat look good
    x_hat = x.mean(0, keepdim=True).expand_as(x)
    assert abs(float(metrics.variance_explained(x, x_hat))) < 1e-6


def test_sparsity_metrics():
    x, x_hat, latents = _data()
    stats = metrics.ReconstructionStats().update(x, x_hat, latents).compute()
    assert torch.isclose(stats["l0"], (latents > 0).sum(-1).double().mean())
    assert torch.isclose(stats["l0"], metrics.l0(latents))
    fired = (latents > 0).double().mean(0)
    assert math.isclose(float(stats["frac_dead"]), float((fired == 0).double().mean()))
    assert math.isclose(float(stats["frac_dense"]), float((fired > 0.1).double().mean()))
    assert float(stats["frac_dead"]) >= 1 / 16 and float(stats["frac_dense"]) >= 1 / 16


def test_accumulating_batches_equals_one_pass():
    x, x_hat, latents = _data(n=300)
    whole = metrics.ReconstructionStats().update(x, x_hat, latents).compute()
    acc = metrics.ReconstructionStats()
    for i in range(0, 300, 70):
        acc.update(x[i : i + 70], x_hat[i : i + 70], latents[i : i + 70])
    for name, value in acc.compute().items():
        assert torch.isclose(value, whole[name], atol=1e-9), name


def test_instance_dimension_is_kept():
    x = torch.randn(50, 3, 2)
    x_hat = x.clone()
    x_hat[:, 1] += 1.0
    ve = metrics.variance_explained(x, x_hat)
    assert ve.shape == (3,)
    assert ve[0] == 1 and ve[2] == 1 and ve[1] < 1


def test_ce_loss_score_and_kl():
    assert metrics.ce_loss_score(2.0, 2.0, 5.0) == 1.0
    assert metrics.ce_loss_score(2.0, 5.0, 5.0) == 0.0
    assert math.isclose(metrics.ce_loss_score(2.0, 2.75, 5.0), 0.75)
    logits = torch.randn(2, 5, 11)
    assert torch.allclose(metrics.kl_div(logits, logits), torch.zeros(2, 5), atol=1e-6)
    other = torch.randn(2, 5, 11)
    p, q = logits.softmax(-1), other.softmax(-1)
    direct = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(metrics.kl_div(logits, other), direct, atol=1e-5)


def test_next_token_ce_matches_cross_entropy():
    logits = torch.randn(2, 6, 13)
    ids = torch.randint(0, 13, (2, 6))
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1), reduction="none")
    assert torch.allclose(metrics.next_token_ce(logits, ids).reshape(-1), direct, atol=1e-5)


def test_feature_recovery():
    true = torch.eye(2).expand(3, 2, 2)  # 3 instances, 2 features in 2-D
    dec = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]]).expand(3, 3, 2).clone()
    dec[2, 1] = torch.tensor([1.0, 1.0])  # instance 2 misses feature 1
    best = metrics.feature_recovery(true, dec)
    assert best.shape == (3, 2)
    assert torch.allclose(best[0], torch.ones(2))
    assert math.isclose(float(best[2, 1]), 1 / math.sqrt(2), rel_tol=1e-5)
    assert metrics.all_recovered(best).tolist() == [True, True, False]


def test_per_token_sq_error():
    x, x_hat, _ = _data()
    assert torch.allclose(metrics.per_token_sq_error(x, x_hat), ((x - x_hat) ** 2).sum(-1))


def test_cosine_and_norm_ratio_leave_out_zero_inputs():
    """Version 2: cossim and l2_ratio average over the inputs with non-zero norm; the rest are counted."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 2, 4, generator=g)
    x[[0, 3, 4]] = 0.0  # zero inputs in both instances
    x[7, 1] = 0.0  # and one more in instance 1
    x_hat = x + 0.1 * torch.randn(10, 2, 4, generator=g)  # nonzero reconstructions of the zero inputs
    got = metrics.ReconstructionStats().update(x[:5], x_hat[:5]).update(x[5:], x_hat[5:]).compute()
    for i, zeros in ((0, [0, 3, 4]), (1, [0, 3, 4, 7])):
        keep = [b for b in range(10) if b not in zeros]
        xi, hi = x[keep, i].double(), x_hat[keep, i].double()
        assert torch.isclose(got["cossim"][i], torch.nn.functional.cosine_similarity(xi, hi, dim=-1).mean())
        assert torch.isclose(got["l2_ratio"][i], (hi.norm(dim=-1) / xi.norm(dim=-1)).mean())
        assert int(got["n_zero_norm_inputs"][i]) == len(zeros)
    all_zero = metrics.ReconstructionStats().update(torch.zeros(3, 4), torch.ones(3, 4)).compute()
    assert torch.isnan(all_zero["cossim"]) and torch.isnan(all_zero["l2_ratio"])
    assert int(all_zero["n_zero_norm_inputs"]) == 3
    assert metrics.METRICS_VERSION == 2
