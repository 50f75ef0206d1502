"""Regenerate workflows/*.json (UI format) from the definitions in scripts/workflow_defs/.

    make workflows        (or: .venv/bin/python scripts/build_workflows.py [name ...])

Each workflow is described once, by node type, widget values and links; widget order and socket
types come from the live node definitions, so the files load on the canvas as saved ones do.
"""
import importlib
import importlib.util
import json
import os
import pkgutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default model of every shipped workflow (MODEL_LOADER) is set in scripts/workflow_defs/common.py.


def all_workflows() -> dict:
    spec = importlib.util.spec_from_file_location("editkit_boot", os.path.join(ROOT, "runner", "boot.py"))
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    boot.boot(threads=1)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import workflow_defs
    found = {}
    for info in pkgutil.iter_modules(workflow_defs.__path__):
        if info.name == "common":
            continue
        mod = importlib.import_module(f"workflow_defs.{info.name}")
        found.update(getattr(mod, "WORKFLOWS", {}))
    return found


if __name__ == "__main__":
    wanted = set(sys.argv[1:])
    out_dir = os.path.join(ROOT, "workflows")
    os.makedirs(out_dir, exist_ok=True)
    for name, fn in sorted(all_workflows().items()):
        if wanted and name not in wanted and name.removesuffix(".json") not in wanted:
            continue
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(fn(), f, indent=1)
            f.write("\n")
        print("wrote", os.path.join("workflows", name))
