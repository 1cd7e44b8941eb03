"""`python -m flows` is the `pets` command."""

from flows.cli import app

app(prog_name="pets")
