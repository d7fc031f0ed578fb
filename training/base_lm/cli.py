"""`python -m training base-lm`: train tinystories-mini (see training/base_lm/__init__.py)."""

from __future__ import annotations

from sae.dataclass_cli import parse_dataclass
from training.base_lm.config import DESCRIPTION, BaseLMConfig, BaseLMError
from training.base_lm.train import train


def main(argv: list[str] | None = None) -> None:
    cfg = parse_dataclass(BaseLMConfig, argv, prog="python -m training base-lm", description=DESCRIPTION)
    try:
        train(cfg)
    except BaseLMError as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
