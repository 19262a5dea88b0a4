"""``python -m adaptr`` runs the CLI."""

from adaptr.cli import run

run()
