"""``python -m adaptools`` runs the CLI."""

from .main import main

main()
