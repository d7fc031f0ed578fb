"""`python -m explorer <command> [--help]`: the explorer's commands (the app itself starts with `python app.py`)."""

from __future__ import annotations

import argparse

from explorer import deploy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m explorer", description="Commands of the SAE explorer.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    deploy_parser = commands.add_parser("deploy", prog="python -m explorer deploy", description=deploy.DESCRIPTION,
                                        help="create or update the app's Hugging Face Space (or --dry-run DIR)")
    deploy.add_arguments(deploy_parser)
    args = vars(parser.parse_args(argv))
    args.pop("command")
    deploy.run(deploy.DeployConfig(**args))


if __name__ == "__main__":
    main()
