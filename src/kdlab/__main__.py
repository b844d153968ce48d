"""``python -m kdlab`` runs the command line (also what ``torchrun -m kdlab`` uses)."""

from kdlab.cli import entry

entry()
