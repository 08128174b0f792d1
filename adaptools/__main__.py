"""``python -m adaptools`` runs the CLI."""

from .cli import main

main()
