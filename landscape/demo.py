"""`python -m landscape.demo`: the command line lives in landscape/cli/demo.py, the recipe in landscape/demo_pipeline.py."""
from landscape.cli.demo import main
from ptp_core.cli import run

if __name__ == "__main__":
    run(main)
