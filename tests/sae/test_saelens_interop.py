"""Our checkpoint folders load in SAELens itself and give the same encodings.

Runs where `sae-lens` is installed (`make interop` builds such an environment); elsewhere the
module is skipped as a whole, since SAELens is not a dependency of the app or the trainer.
"""

from pathlib import Path

import pytest
import torch

from sae.architectures import build_sae
from sae.checkpoint import list_checkpoints, load_sae, save_sae
from sae.config import SAEConfig

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed: run `make interop`")

ROOT = Path(__file__).resolve().parents[2]


def _assert_same_encodings(folder: Path, n: int = 64) -> None:
    ours = load_sae(folder)
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    x = torch.randn(n, ours.cfg.d_in, generator=torch.Generator().manual_seed(0))
    x = x * 2 + ours.b_dec.detach()  # around the data the SAE saw, so latents fire
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5), folder
        assert torch.allclose(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x)), atol=1e-5), folder


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk"])
def test_freshly_saved_folders_load_in_saelens(tmp_path, arch):
    cfg = SAEConfig(arch, d_in=6, d_sae=12, k=3 if arch == "topk" else None, init_threshold=0.05,
                    metadata={"model_name": "test", "hook_name": "blocks.0.hook_resid_post"})
    sae = build_sae(cfg, seed=1)
    with torch.no_grad():  # move off the symmetric init so every weight matters
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = save_sae(sae, tmp_path / arch)
    _assert_same_encodings(folder)


def test_shipped_checkpoints_load_in_saelens():
    infos = list_checkpoints(ROOT / "checkpoints")
    finals = [i for i in infos if i.step is None]
    assert finals, "no shipped checkpoints found"
    # Every toy folder of one run of each architecture, and every final LM SAE.
    seen_toy: set[str] = set()
    for info in finals:
        if info.model_name == "toy-superposition":
            run = info.path.parent.name
            if run in seen_toy and not info.path.name.endswith("00"):
                continue
            seen_toy.add(run)
        _assert_same_encodings(info.path)
