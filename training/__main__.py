"""`python -m training <command> [--help]`: one entry point for every training command."""

from __future__ import annotations

import importlib
import sys

# command -> (module exposing `main(argv)`, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("training.toy.cli", "train SAEs on toy models of superposition (all instances at once)"),
    "tinystories": ("training.tinystories_cli", "train SAEs of several widths on a language model's residual stream"),
    "base-lm": ("training.base_lm.cli", "train the small offline TinyStories GPT-Neo and its tokenizer"),
    "lm-eval": ("training.lm_eval", "perplexity of a language model on held-out stories (per token, byte, word)"),
    "push": ("training.hub", "upload a checkpoints tree to the Hugging Face Hub (or --dry-run)"),
    "latents": ("training.latent_report", "print a Markdown table of latents' top-activating contexts"),
}


def usage() -> str:
    lines = ["usage: python -m training <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `python -m training <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    module.main(rest)


if __name__ == "__main__":
    main()
