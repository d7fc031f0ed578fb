"""Checkpoint folders: atomic rewrites keep intermediate steps; listing finds every SAE."""

import pytest

from sae.architectures import build_sae
from sae.checkpoint import list_checkpoints, load_sae, sae_folder, save_sae, step_folder
from sae.config import SAEConfig


def _sae(seed=0):
    cfg = SAEConfig("standard", d_in=4, d_sae=6, metadata={"model_name": "m", "hook_name": "blocks.0.hook_resid_post"})
    return build_sae(cfg, seed=seed)


def test_rewriting_a_final_folder_keeps_its_steps(tmp_path):
    folder = sae_folder(tmp_path, "m", "blocks.0.hook_resid_post", "standard", 6)
    save_sae(_sae(0), step_folder(folder, 100))
    save_sae(_sae(1), folder)
    save_sae(_sae(2), folder)  # a second final write must not drop steps/
    assert (step_folder(folder, 100) / "cfg.json").is_file()
    infos = list_checkpoints(tmp_path)
    assert [(i.run, i.d_sae, i.step) for i in infos] == [("standard", 6, 100), ("standard", 6, None)]


def test_failed_write_leaves_the_old_folder_and_steps_intact(tmp_path):
    folder = tmp_path / "F6"
    save_sae(_sae(0), step_folder(folder, 5))
    save_sae(_sae(1), folder)
    before = load_sae(folder).W_enc.clone()

    def explode(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_sae(_sae(2), folder, extra=explode)
    assert (load_sae(folder).W_enc == before).all()
    assert (step_folder(folder, 5) / "sae_weights.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
