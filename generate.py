"""Generate text with a TTT-E2E (or baseline) model: see ttt_e2e/inference/cli.py, or --help."""
import sys

from ttt_e2e.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
