"""Console entry point of editkit-run (installed into .venv/bin by `make setup`)."""
import os
import runpy
import sys

sys.argv[0] = "editkit-run"
runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runner", "cli.py"), run_name="__main__")
