"""The `a3lm` command. Each subcommand lives beside the idea it drives; this file only wires them."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Any-order autoregressive language models (A3).")


@app.command()
def version() -> None:
    """Print the a3lm, torch and transformers versions."""
    import torch
    import transformers

    from . import __version__

    typer.echo(f"a3lm {__version__}  torch {torch.__version__}  transformers {transformers.__version__}")


if __name__ == "__main__":
    app()
