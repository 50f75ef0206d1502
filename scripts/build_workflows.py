"""Regenerate workflows/*.json (UI format) from the definitions in scripts/workflow_defs/, and the
example images they load (web/examples/, rendered by toyworld/examples.py).

    make workflows        (or: .venv/bin/python scripts/build_workflows.py [id ...])

Each module of scripts/workflow_defs/ has WORKFLOWS = {id: (title, fn)}: the file is workflows/<title>.json
(the title is what the Templates browser shows, "<Area> - <technique>"), the id (stable, in the file's
extra.editkit.id) is how tests and tools find it. Widget order and socket types come from the live node
definitions, so the files load on the canvas as saved ones do. Thumbnails: scripts/build_thumbnails.py.
"""
import glob
import importlib
import importlib.util
import json
import os
import pkgutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boot():
    if "editkit_boot" in sys.modules:
        return sys.modules["editkit_boot"]
    spec = importlib.util.spec_from_file_location("editkit_boot", os.path.join(ROOT, "runner", "boot.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["editkit_boot"] = mod
    mod.boot(threads=1)
    return mod


def all_workflows() -> dict:
    """{id: (title, fn)} of every definition module."""
    boot()
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import workflow_defs
    found = {}
    for info in pkgutil.iter_modules(workflow_defs.__path__):
        if info.name == "common":
            continue
        mod = importlib.import_module(f"workflow_defs.{info.name}")
        for wid, entry in getattr(mod, "WORKFLOWS", {}).items():
            if wid in found:
                raise ValueError(f"workflow id {wid!r} defined twice")
            found[wid] = entry
    titles = [t for t, _ in found.values()]
    dupes = {t for t in titles if titles.count(t) > 1}
    if dupes:
        raise ValueError(f"workflow titles used twice: {sorted(dupes)}")
    return found


def build(wid: str, title: str, fn) -> dict:
    data = fn()
    data["extra"]["editkit"] = {"id": wid}
    return data


def main(wanted) -> None:
    boot()
    from editkit.toyworld import examples
    for p in examples.write(os.path.join(ROOT, "web", "examples")):
        print("wrote", os.path.relpath(p, ROOT))
    out_dir = os.path.join(ROOT, "workflows")
    os.makedirs(out_dir, exist_ok=True)
    written = set()
    for wid, (title, fn) in sorted(all_workflows().items(), key=lambda kv: kv[1][0]):
        name = f"{title}.json"
        written.add(name)
        if wanted and wid not in wanted and title not in wanted:
            continue
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(build(wid, title, fn), f, indent=1)
            f.write("\n")
        print("wrote", os.path.join("workflows", name))
    if not wanted:  # a full build removes files no definition makes any more (renamed or dropped workflows)
        for path in glob.glob(os.path.join(out_dir, "*.json")) + glob.glob(os.path.join(out_dir, "*.jpg")):
            if os.path.basename(path)[:-4 if path.endswith(".jpg") else -5] + ".json" not in written:
                os.remove(path)     # and its thumbnail
                print("removed", os.path.relpath(path, ROOT))


if __name__ == "__main__":
    main(set(sys.argv[1:]))
