"""`python -m flows` is the `pets` command."""

from flows.cli import main

main()
