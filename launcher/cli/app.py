"""The Typer application every command module registers on (public Typer API only)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="launch",
    help=(
        "Serve open LLMs with a longer context than they were trained for, on lmdeploy.\n\n"
        "Example: launch serve internlm2_5-7b-chat --factor 2"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rendering it with rich would double `launch --help`'s time
    context_settings={"help_option_names": ["-h", "--help"]},
)
