"""The architecture registry is the one list of architectures: everything else that names them must agree.

Adding an architecture means a module in sae/architectures/ and a REGISTRY entry; this test then says
which other place (configs, CLIs, defaults, saved shapes, resampling's latent axes) still needs it.
"""

import argparse
import typing

import pytest
import torch
from safetensors.torch import load_file

from sae.architectures import ARCHITECTURES, REGISTRY, build_sae
from sae.checkpoint import expected_shapes, load_sae, save_sae
from sae.config import SAEConfig
from sae.dataclass_cli import add_dataclass_arguments, field_docs
from sae.layout import WEIGHTS_FILE
from training.tinystories_cli import TinyStoriesConfig
from training.toy import cli as toy_cli
from training.toy.sae_training import ARCH_DEFAULTS, ToySAEConfig
from training.trainer_config import DEFAULT_SPARSITY, VARIANTS, TrainerConfig, sae_config_for

D_IN, D_SAE = 6, 10


def _cfg(arch: str, **kw) -> SAEConfig:
    return SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=3 if arch == "topk" else None, **kw)


def test_architectures_is_the_registry():
    assert ARCHITECTURES == tuple(REGISTRY)
    for arch in REGISTRY:
        assert isinstance(build_sae(_cfg(arch)), REGISTRY[arch])
    with pytest.raises(ValueError, match="unknown architecture"):
        SAEConfig(architecture="nope", d_in=2, d_sae=2)


def test_toy_config_and_cli_list_the_registry():
    literal = typing.get_args(typing.get_type_hints(ToySAEConfig)["architecture"])
    assert set(literal) == set(REGISTRY)
    assert set(ARCH_DEFAULTS) == set(REGISTRY)
    for arch, defaults in ARCH_DEFAULTS.items():
        assert set(defaults) <= {f for f in SAEConfig.__dataclass_fields__}, arch
        ToySAEConfig(architecture=arch).sae_config(2, 2)  # every default makes a valid config
    action = next(a for a in toy_cli.build_parser()._actions if "--architecture" in a.option_strings)
    assert tuple(action.choices) == ARCHITECTURES


def test_language_model_trainer_lists_the_registry():
    assert set(REGISTRY) <= set(VARIANTS), "every architecture is a run name of its own"
    assert {arch for arch, _ in VARIANTS.values()} <= set(REGISTRY)
    assert set(DEFAULT_SPARSITY) <= set(REGISTRY)
    for run in VARIANTS:
        sae_config_for(TrainerConfig(), run, D_IN, D_SAE, {})
    doc = field_docs(TrainerConfig)["architectures"]
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TinyStoriesConfig)  # the `python -m training tinystories` flags
    help_text = next(a.help for a in parser._actions if "--architectures" in a.option_strings)
    for arch in REGISTRY:
        assert arch in doc and arch in help_text, arch
    for arch in set(REGISTRY) - {"topk"}:  # topk's sparsity is its k
        assert arch in DEFAULT_SPARSITY, arch


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saved_shapes_match_the_module(tmp_path, arch):
    sae = build_sae(_cfg(arch), seed=0)
    folder = save_sae(sae, tmp_path / arch)
    saved = {name: tuple(t.shape) for name, t in load_file(str(folder / WEIGHTS_FILE)).items()}
    assert saved == {name: tuple(t.shape) for name, t in sae.saved_tensors().items()}
    assert saved == expected_shapes(sae.cfg)
    assert type(load_sae(folder)) is REGISTRY[arch]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_per_latent_parameter_has_a_latent_axis(arch):
    """Resampling resets optimizer state through latent_axes(): a parameter missing there keeps stale moments."""
    sae = build_sae(_cfg(arch), seed=0)
    axes = sae.latent_axes()
    params = dict(sae.named_parameters())
    assert set(axes) <= set(params)
    for name, p in params.items():
        if D_SAE in p.shape:
            assert name in axes and p.shape[axes[name]] == D_SAE, name
        else:
            assert name not in axes, name
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[0] = True
    sae.reinit_latents_(dead, torch.eye(D_SAE, D_IN), 1.0)  # every architecture implements the contract
