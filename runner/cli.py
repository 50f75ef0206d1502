"""editkit-run: run a workflow JSON (UI or API format) headless through ComfyUI's PromptExecutor.

    editkit-run workflows/sdedit.json --out out/ --seed 5 --set 7.strength=0.4 --set "Edit prompt.text=a cat"
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(prompt: dict, sets: list[str]) -> None:
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SystemExit(f"--set {item!r}: expected NODE.INPUT=VALUE (NODE is a node id or title)")
        target, value = item.split("=", 1)
        node, name = target.rsplit(".", 1)
        ids = [k for k, v in prompt.items() if k == node or v.get("_meta", {}).get("title") == node]
        if not ids:
            raise SystemExit(f"--set {item!r}: no node with id or title {node!r}")
        for nid in ids:
            prompt[nid]["inputs"][name] = parse_value(value)


def apply_seed(prompt: dict, seed: int) -> None:
    for v in prompt.values():
        for key in ("seed", "noise_seed"):
            if key in v["inputs"] and not isinstance(v["inputs"][key], list):
                v["inputs"][key] = seed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="editkit-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="workflow JSON file (UI or API format)")
    ap.add_argument("--out", default="out", help="directory for the output images (default: out/)")
    ap.add_argument("--seed", type=int, help="set every seed / noise_seed widget to this value")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override an input")
    args = ap.parse_args(argv)

    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("editkit_boot", os.path.join(here, "boot.py"))
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    sys.modules["editkit_boot"] = boot
    boot.boot(threads=int(os.environ.get("TORCH_THREADS", "0")) or None)
    import nodes
    from editkit.runner import execute, workflow

    try:
        prompt = workflow.to_api(workflow.load(args.workflow), nodes.NODE_CLASS_MAPPINGS)
    except (workflow.WorkflowError, OSError) as e:
        print(f"editkit-run: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        apply_seed(prompt, args.seed)
    apply_overrides(prompt, args.set)
    t0 = time.perf_counter()
    result = execute.run_prompt(prompt)
    os.makedirs(args.out, exist_ok=True)
    files = []
    import folder_paths
    for path in result.files(folder_paths.get_output_directory()):
        dest = os.path.join(args.out, os.path.basename(path))
        shutil.copyfile(path, dest)
        files.append(dest)
    summary = {"workflow": args.workflow, "success": result.success, "outputs": files,
               "node_times": {k: round(v, 4) for k, v in result.node_times.items()},
               "total_time": round(time.perf_counter() - t0, 3)}
    if not result.success:
        err = result.error or {}
        if "node_errors" in err:
            for nid, ne in (err.get("node_errors") or {}).items():
                for e in ne.get("errors", []):
                    print(f"editkit-run: node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}", file=sys.stderr)
            if not err.get("node_errors"):
                print(f"editkit-run: {err.get('validation')}", file=sys.stderr)
        else:
            print(f"editkit-run: node {err.get('node_id')} ({err.get('node_type')}): {err.get('exception_message')}", file=sys.stderr)
        summary["error"] = {k: v for k, v in err.items() if k != "traceback"}
    print(json.dumps(summary, indent=1, default=str))
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
