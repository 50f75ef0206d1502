"""Run the benchmarks: `make bench` (all but the long ones), `make bench BENCH_ARGS="import lora"`
(named ones) or `make bench BENCH_ARGS=all`.

Each bench/bench_<name>.py defines TITLE and run() -> list of row dicts (SLOW = True keeps a long
one out of the default set); rows are printed as Markdown tables and merged into
bench/results/latest.json.
"""
import importlib
import json
import os
import pkgutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import boot, host_line, print_table  # noqa: E402


def main(argv):
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([HERE]) if m.name.startswith("bench_"))
    everything = argv == ["all"]
    argv = [] if everything else argv
    wanted = [n for n in names if n in argv or (not argv and (everything or not _is_slow(n)))]
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
    skipped = [n for n in names if n not in wanted and not argv]
    if skipped:
        print(f"\n(skipped long benchmarks {skipped}: run `make bench BENCH_ARGS=\"{' '.join(skipped)}\"` or BENCH_ARGS=all)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "latest.json")
    previous = {}
    if os.path.exists(path):
        try:
            previous = json.load(open(path))
        except ValueError:
            previous = {}
    with open(path, "w") as f:
        json.dump({**previous, **results, "_host": host_line()}, f, indent=1)


def _is_slow(name: str) -> bool:
    import ast
    tree = ast.parse(open(os.path.join(HERE, f"bench_{name}.py")).read())
    return any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "SLOW" for t in n.targets)
               and getattr(n.value, "value", False) is True for n in tree.body)


if __name__ == "__main__":
    main(sys.argv[1:])
