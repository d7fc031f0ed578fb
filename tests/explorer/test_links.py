"""explorer/links.py: decoder-cosine matches across widths, their verdicts, the per-pair cache."""

import pytest
import torch
from conftest import save_tiny_gpt_neo

from explorer.errors import AnalysisError
from explorer.links import CosineCache, Match, best_matches, decoder_cosines, link_latent, verdict
from sae.architectures import build_sae
from sae.base_model import load_base_model, residual_at
from sae.config import SAEConfig

D = 32
HOOK = "blocks.1.hook_resid_post"
STORY = "Once upon a time, there was a little dog named Max. Max liked to run in the park."


def _sae(d_sae: int, seed: int):
    sae = build_sae(SAEConfig("standard", D, d_sae, metadata={"model_name": "tiny-neo", "hook_name": HOOK}),
                    seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae.eval()


def _unit(v):
    return v / v.norm()


@pytest.fixture(scope="module")
def bm(tmp_path_factory):
    return load_base_model(str(save_tiny_gpt_neo(tmp_path_factory.mktemp("m") / "tiny-neo", hidden=D, layers=2,
                                                 positions=48)))


@pytest.fixture(scope="module")
def family():
    """A (F=16); B (F=32) holds A's latent 3 split over latents 5 and 9; C (F=24) holds it exactly at 7;
    E (F=8) holds only directions orthogonal to it."""
    torch.manual_seed(0)
    a, b, c, e = _sae(16, 0), _sae(32, 1), _sae(24, 2), _sae(8, 3)
    d = _unit(a.W_dec[3].detach())
    ortho = torch.randn(D, D)
    ortho = ortho - (ortho @ d)[:, None] * d  # every row orthogonal to d
    with torch.no_grad():
        b.W_dec.mul_(0.05).add_(0)  # small random rows: weak cosines
        b.W_dec[5] = _unit(d + 0.6 * _unit(ortho[0]))
        b.W_dec[9] = _unit(d + 0.6 * _unit(ortho[1]))
        c.W_dec[7] = d
        e.W_dec.copy_(torch.stack([_unit(r) for r in ortho[:8]]))
    return a, b, c, e


def test_decoder_cosines(family):
    a, b, *_ = family
    cos = decoder_cosines(a, b)
    assert cos.shape == (16, 32)
    i, j = 2, 11
    ref = torch.nn.functional.cosine_similarity(a.W_dec[i].detach(), b.W_dec[j].detach(), dim=0)
    assert float(cos[i, j]) == pytest.approx(float(ref), abs=1e-6)


@pytest.mark.parametrize("cosines, expected", [
    ([0.95, 0.2, 0.1], "close match"),
    ([0.7, 0.6, 0.1], "split"),
    ([0.9, 0.55], "split"),
    ([0.45, 0.3], "spread"),
    ([0.2, 0.1], "nothing alike"),
    ([], "nothing alike"),
])
def test_verdicts(cosines, expected):
    assert verdict([Match(i, c) for i, c in enumerate(cosines)]) == expected


def test_matches_and_strips(bm, family):
    a, b, c, e = family
    cache = CosineCache()
    others = [("F=32", "b", b), ("F=24", "c", c), ("F=8", "e", e)]
    res = link_latent(bm, a, "a", others, HOOK, STORY, 3, cache)
    by = {w.label: w for w in res.widths}
    assert {m.latent for m in by["F=32"].matches[:2]} == {5, 9} and by["F=32"].verdict == "split"
    assert by["F=24"].matches[0] == Match(7, pytest.approx(1.0, abs=1e-5)) and by["F=24"].verdict == "close match"
    assert by["F=8"].verdict == "nothing alike" and abs(by["F=8"].matches[0].cosine) < 1e-5
    assert best_matches(decoder_cosines(a, b)[3], 2) == by["F=32"].matches[:2]
    # each strip is the other SAE's activation of that latent on the user's text
    ids = torch.tensor([bm.tokenizer(STORY).input_ids])
    with torch.no_grad():
        z = b.encode(residual_at(bm, ids, None, 1)[0])
    torch.testing.assert_close(by["F=32"].acts[:, 0], z[:, by["F=32"].matches[0].latent])
    torch.testing.assert_close(res.original_acts, a.encode(residual_at(bm, ids, None, 1)[0]).detach()[:, 3])
    # the cosine matrices are cached per pair
    assert cache.computed == 3
    link_latent(bm, a, "a", others, HOOK, STORY, 4, cache)
    assert cache.computed == 3


def test_out_of_range_latent(bm, family):
    a, b, *_ = family
    with pytest.raises(AnalysisError, match=r"latents 0\.\.15"):
        link_latent(bm, a, "a", [("F=32", "b", b)], HOOK, STORY, 16, CosineCache())
