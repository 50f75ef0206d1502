"""Run the benchmarks: `make bench` (all) or `make bench BENCH_ARGS="import attention_maps"`.

Each bench/bench_<name>.py defines TITLE and run() -> list of row dicts; rows are printed as
Markdown tables and saved to bench/results/latest.json.
"""
import importlib
import json
import os
import pkgutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import boot, print_table  # noqa: E402


def main(argv):
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([HERE]) if m.name.startswith("bench_"))
    wanted = [n for n in names if not argv or n in argv]
    unknown = set(argv) - set(names)
    if unknown:
        raise SystemExit(f"unknown benchmarks {sorted(unknown)}; available: {names}")
    boot()
    results = {}
    for name in wanted:
        mod = importlib.import_module(f"bench_{name}")
        rows = mod.run()
        results[name] = rows
        print_table(mod.TITLE, rows)
        sys.stdout.flush()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "latest.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
