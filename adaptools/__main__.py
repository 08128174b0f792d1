"""``python -m adaptools`` runs the CLI."""

from .entry import main

main()
