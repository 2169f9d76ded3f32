"""`python -m landscape.connect`: the command line lives in landscape/cli/connect.py."""
from landscape.cli.connect import main
from ptp_core.cli import run

run(main)
