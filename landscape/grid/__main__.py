"""`python -m landscape.grid`: the command line lives in landscape/cli/grid.py."""
from landscape.cli.grid import main
from ptp_core.cli import run

run(main)
