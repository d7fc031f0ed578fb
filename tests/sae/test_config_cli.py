"""SAEConfig <-> cfg.json and the dataclass command line."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sae.config import SAEConfig
from sae.dataclass_cli import field_docs, parse_dataclass


def test_cfg_json_round_trip_and_saelens_shape():
    cfg = SAEConfig("topk", d_in=4, d_sae=8, k=2, metadata={"hook_name": "blocks.1.hook_resid_post"})
    d = cfg.to_saelens_dict()
    for key in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations", "k", "architecture", "metadata"):
        assert key in d
    assert d["apply_b_dec_to_input"] is True and d["normalize_activations"] == "none"
    back = SAEConfig.from_saelens_dict(d)
    assert back == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"architecture": "nope", "d_in": 2, "d_sae": 3}, "unknown architecture"),
        ({"architecture": "topk", "d_in": 2, "d_sae": 3}, "k"),
        ({"architecture": "gated", "d_in": 2, "d_sae": 3, "tied": True}, "tied"),
        ({"architecture": "standard", "d_in": 0, "d_sae": 3}, "positive"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**kwargs)


def test_unsupported_saelens_settings_are_refused():
    d = SAEConfig("standard", 4, 8).to_saelens_dict()
    d["normalize_activations"] = "expected_average_only_in"
    with pytest.raises(ValueError, match="normalize_activations"):
        SAEConfig.from_saelens_dict(d)


@dataclass
class _Demo:
    steps: int = 10
    """How many steps to run."""
    widths: list[int] = field(default_factory=lambda: [1, 2])
    """Latent widths."""
    out: Path = Path("x")
    """Where to write."""
    name: str | None = None
    """Optional name."""
    fast: bool = False
    """Go fast."""


def test_dataclass_cli_parses_types_and_docs(capsys):
    assert field_docs(_Demo)["steps"] == "How many steps to run."
    cfg = parse_dataclass(_Demo, ["--steps", "3", "--widths", "5", "6", "--out", "y", "--fast"], "demo", "d")
    assert cfg == _Demo(steps=3, widths=[5, 6], out=Path("y"), name=None, fast=True)
    assert parse_dataclass(_Demo, ["--name", "none", "--fast", "false"], "demo", "d").fast is False
    with pytest.raises(SystemExit):
        parse_dataclass(_Demo, ["--help"], "demo", "d")
    assert "How many steps to run." in capsys.readouterr().out
