"""`python -m landscape.plot`: the command line lives in landscape/cli/plot.py."""
from landscape.cli.plot import main
from ptp_core.cli import run

if __name__ == "__main__":
    run(main)
