"""editkit-run: run a ComfyUI workflow JSON (UI or API format) headless, or queue it on a server.

In-process (default): ComfyUI's real PromptExecutor in this process, no server.
    editkit-run "workflows/Editing - SDEdit.json" --model toy --out out/ --seed 5 --set EditKitSDEdit.strength=0.4
Server mode: POST /prompt to a running ComfyUI, follow it over the websocket, download the images.
    editkit-run "workflows/Editing - SDEdit.json" --server http://127.0.0.1:8188 --out out/

--set NODE.INPUT=VALUE addresses a node by id, title or type (VALUE is JSON, else a string).
--model toy runs a workflow made for a real checkpoint on EditKit's toy model (runner/substitute.py:
loaders swapped for the toy model and demo files, pixel sizes scaled to its 128 px); the rest of the
graph is the shipped one. Example images that Load Image names (web/examples/) are copied into the
input folder (in-process) or uploaded to the server when missing there.
A progress bar goes to stderr; the JSON summary (output files, per-node times, total time) to stdout.
Exit codes: 0 ok, 1 the run failed (a node error; outputs written before it are kept), 2 bad input.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class UsageError(Exception):
    """Bad input to the runner: printed as one line, exit code 2."""


def _runner_pkg():
    """The runner package without booting ComfyUI (server mode needs no torch)."""
    if "editkit_runner" not in sys.modules:
        spec = importlib.util.spec_from_file_location("editkit_runner", os.path.join(HERE, "__init__.py"),
                                                      submodule_search_locations=[HERE])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["editkit_runner"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["editkit_runner"]


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def find_nodes(prompt: dict, ref: str) -> list[str]:
    """Node ids matching ref: an id, else a title, else a node type."""
    if ref in prompt:
        return [ref]
    by_title = [k for k, v in prompt.items() if (v.get("_meta") or {}).get("title") == ref]
    if by_title:
        return by_title
    return [k for k, v in prompt.items() if v.get("class_type") == ref]


def apply_overrides(prompt: dict, sets: list[str], node_defs: dict | None = None) -> None:
    from editkit_runner.workflow import node_inputs
    for item in sets:
        target, sep, value = item.partition("=")
        if not sep or "." not in target:
            raise UsageError(f"--set {item!r}: expected NODE.INPUT=VALUE (NODE is a node id, title or type)")
        node, name = target.rsplit(".", 1)
        ids = find_nodes(prompt, node)
        if not ids:
            raise UsageError(f"--set {item!r}: no node with id, title or type {node!r}")
        for nid in ids:
            ctype = prompt[nid]["class_type"]
            if node_defs is not None and ctype in node_defs:
                names = [d.name for d in node_inputs(ctype, node_defs)]
                if name not in names:
                    raise UsageError(f"--set {item!r}: node {nid} ({ctype}) has no input {name!r}; inputs: {', '.join(names)}")
            prompt[nid]["inputs"][name] = parse_value(value)


def apply_seed(prompt: dict, seed: int) -> None:
    for v in prompt.values():
        for key in ("seed", "noise_seed"):
            if key in v["inputs"] and not isinstance(v["inputs"][key], list):
                v["inputs"][key] = seed


def _one_line(text, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def node_label(prompt: dict, nid) -> str:
    entry = prompt.get(str(nid)) or {}
    title = (entry.get("_meta") or {}).get("title")
    ctype = entry.get("class_type", "?")
    return f"node {nid} ({ctype}{', ' + repr(title) if title and title != ctype else ''})"


def error_lines(prompt: dict, node_errors: dict | None, error: dict | None) -> list[str]:
    """One line per problem, naming the node and the input."""
    lines = []
    for nid, ne in (node_errors or {}).items():
        for e in ne.get("errors", []):
            inp = (e.get("extra_info") or {}).get("input_name")
            where = f"{node_label(prompt, nid)}, input {inp!r}" if inp else node_label(prompt, nid)
            details = e.get("details") or ""
            lines.append(f"{where}: {_one_line(e.get('message', 'invalid'))}{': ' + _one_line(details) if details else ''}")
    if error and error.get("node_id") is not None:
        lines.append(f"{node_label(prompt, error['node_id'])} failed: "
                     f"{_one_line(error.get('exception_message') or error.get('exception_type') or 'error')}")
    elif error and not lines:
        v = error.get("validation")
        if isinstance(v, dict):
            v = f"{v.get('message', 'invalid prompt')}{': ' + str(v['details']) if v.get('details') else ''}"
        lines.append(_one_line(v or error.get("exception_message") or error))
    return lines


def _provide_examples(prompt: dict, server: str | None, node_defs: dict) -> None:
    """Shipped example images the prompt's Load Image nodes name: into the input folder when missing."""
    from editkit_runner import assets
    needed = assets.examples_used(prompt)
    if not needed:
        return
    if server:
        from editkit_runner import client, workflow
        spec = (workflow.input_spec("LoadImage", node_defs).get("required") or {}).get("image") or [[]]
        listed = spec[1].get("options", []) if spec[0] == "COMBO" and len(spec) > 1 else spec[0]
        for name in needed:
            if name not in listed:
                client.upload_image(server, assets.example_images()[name], name)
    else:
        import folder_paths
        assets.copy_examples(prompt, folder_paths.get_input_directory())


def _boot():
    if "editkit_boot" in sys.modules and "editkit" in sys.modules:  # already booted (tests, scripts)
        return
    spec = importlib.util.spec_from_file_location("editkit_boot", os.path.join(HERE, "boot.py"))
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    sys.modules["editkit_boot"] = boot
    boot.boot(threads=int(os.environ.get("TORCH_THREADS", "1")) or None)


def main(argv=None) -> int:
    import logging
    level = logging.getLogger().level
    pbar = sys.modules.get("comfy.utils") and sys.modules["comfy.utils"].PROGRESS_BAR_ENABLED
    try:
        return _main(argv)
    finally:  # leave the process as it was (main() is also called in-process by tests and scripts)
        logging.getLogger().setLevel(level)
        if pbar is not None and "comfy.utils" in sys.modules:
            sys.modules["comfy.utils"].PROGRESS_BAR_ENABLED = pbar


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="editkit-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="workflow JSON file (UI format as the canvas saves it, or API format)")
    ap.add_argument("--out", default="out", help="directory for the output images (default: out/)")
    ap.add_argument("--seed", type=int, help="set every seed / noise_seed widget to this value")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override an input (repeatable)")
    ap.add_argument("--server", metavar="URL", help="queue on a running ComfyUI (e.g. http://127.0.0.1:8188) instead of in-process")
    ap.add_argument("--timeout", type=float, default=3600, help="server mode: seconds to wait for the result")
    ap.add_argument("--model", choices=["toy"], help="run on EditKit's toy model instead of the checkpoints the "
                    "workflow loads (loaders swapped, image sizes scaled; see runner/substitute.py)")
    ap.add_argument("--max-steps", type=int, metavar="N", help="speed knob (tests, quick looks): nodes with more than N "
                    "steps run N, their step indices (T_skip, start step) scaled along; default: the shipped steps")
    ap.add_argument("--save-api", metavar="FILE", help="also write the API-format prompt that was run")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--verbose", action="store_true", help="show ComfyUI's own log (warnings, tracebacks)")
    args = ap.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    if not args.verbose:  # problems are reported as one line each below; ComfyUI's log has the tracebacks
        logging.getLogger().setLevel(logging.CRITICAL)
    _runner_pkg()
    from editkit_runner import workflow
    from editkit_runner.progress import Progress

    def fail(msg: str, code: int = 2) -> int:
        print(f"editkit-run: {msg}", file=sys.stderr)
        return code

    try:
        data = workflow.load(args.workflow)
    except (workflow.WorkflowError, OSError) as e:
        return fail(str(e) if isinstance(e, workflow.WorkflowError) else f"{args.workflow}: {e.strerror or e}")

    if args.server:
        from editkit_runner import client
        try:
            node_defs = client.object_info(args.server)
        except client.ServerError as e:
            return fail(str(e))
    else:
        _boot()
        import nodes
        node_defs = nodes.NODE_CLASS_MAPPINGS
    try:
        prompt = workflow.to_api(data, node_defs)
        if args.model or args.max_steps:
            from editkit_runner import substitute
            if args.max_steps is not None and args.max_steps < 1:
                raise UsageError("--max-steps must be at least 1")
            changes = substitute.plan(prompt, substitute.hints(data), args.model, max_steps=args.max_steps)
            prompt = substitute.apply(prompt, changes)
        if args.seed is not None:
            apply_seed(prompt, args.seed)
        apply_overrides(prompt, args.set, node_defs)
    except (workflow.WorkflowError, UsageError) as e:
        return fail(str(e))
    if args.save_api:
        with open(args.save_api, "w") as f:
            json.dump(prompt, f, indent=1)

    try:
        _provide_examples(prompt, args.server, node_defs)
    except Exception as e:  # noqa: BLE001 (a server that refuses the upload, a read-only input folder)
        return fail(f"could not provide the example image: {e}")
    progress = Progress(prompt, enabled=not args.quiet)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    summary = {"workflow": args.workflow, "mode": "server" if args.server else "in-process"}
    if args.server:
        from editkit_runner import client
        try:
            res = client.run(args.server, prompt, args.out, on_event=progress.event, timeout=args.timeout)
        except client.ServerError as e:
            lines = error_lines(prompt, e.node_errors, None) or [str(e)]
            for line in lines:
                print(f"editkit-run: {line}", file=sys.stderr)
            summary.update(success=False, outputs=[], node_times={}, total_time=round(time.perf_counter() - t0, 3),
                           error={"message": str(e), "node_errors": e.node_errors})
            print(json.dumps(summary, indent=1, default=str))
            return 2 if e.node_errors else 1
        success, files, node_times = res["success"], res["outputs"], res["node_times"]
        node_errors, error = res["node_errors"], res["error"]
        summary["prompt_id"] = res["prompt_id"]
    else:
        from editkit.runner import execute
        import comfy.utils
        import folder_paths
        comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars from the samplers: ours replaces them
        result = execute.run_prompt(prompt, on_event=progress.event, keep_outputs=False)
        files = []
        for path in result.files(folder_paths.get_output_directory()):
            dest = os.path.join(args.out, os.path.basename(path))
            shutil.copyfile(path, dest)
            files.append(dest)
        success, node_times, node_errors, error = result.success, result.node_times, result.node_errors, result.error
        if error and "node_errors" in error:
            error = None if node_errors else error
    progress.finish(success)
    summary.update(success=success, outputs=files, node_times={k: round(v, 4) for k, v in node_times.items()},
                   total_time=round(time.perf_counter() - t0, 3))
    if not success:
        lines = error_lines(prompt, node_errors, error)
        for line in lines:
            print(f"editkit-run: {line}", file=sys.stderr)
        summary["error"] = {"lines": lines, "node_errors": node_errors,
                            **{k: v for k, v in (error or {}).items() if k != "traceback"}}
    print(json.dumps(summary, indent=1, default=str))
    if success:
        return 0
    # Validation problems (missing model file, wrong value type, ...) are bad input.
    return 2 if node_errors and not (error and error.get("node_id") is not None) else 1


if __name__ == "__main__":
    sys.exit(main())
