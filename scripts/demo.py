"""`make demo`: the edit demo on EditKit's trained toy model, then example workflows headless with
editkit-run; every image lands in out/ and its path is printed.

1. A captioned scene is generated, then edited with the strongest technique on main (inversion +
   Prompt-to-Prompt word swap with local blend): a before/after grid with the edit's attention maps,
   and the edit metrics read by the toy world's checker (edit success, preservation, reconstruction).
2. A few shipped workflows run through editkit-run (the same runner users call): the toy-model demos
   as they are, the others (made for your checkpoint and photo) with `--model toy`.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The workflows `make demo` runs (ids, extra.editkit.id of workflows/*.json); EDITKIT_DEMO="id id" or "all" overrides.
DEMO_WORKFLOWS = ["toy_sdedit", "toy_p2p_inverted", "toy_autoguidance", "inversion_direct", "attention_maps",
                  "guidance_stack"]


def edit_demo(out: str) -> bool:
    """The toy-world before/after edit (toyworld/demo.py), in this process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("editkit_boot", os.path.join(ROOT, "runner", "boot.py"))
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    sys.modules["editkit_boot"] = boot
    boot.boot(threads=int(os.environ.get("TORCH_THREADS", "0")) or None)
    from editkit.toyworld import demo
    print("[demo] toy model: generate a scene, then edit it (this takes a minute on a CPU) ...", flush=True)
    r = demo.run(out)
    print(f"[demo]   technique: {r.get('technique')}")
    for key in ("grid", "attention"):
        if r.get(key):
            print(f"[demo]   {key}: {os.path.relpath(r[key], ROOT)}")
    metrics = r.get("metrics") or {}
    if metrics:
        print("[demo]   edit metrics: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in metrics.items()))
    return True


def main():
    out = os.path.join(ROOT, "out")
    os.makedirs(out, exist_ok=True)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    ok = edit_demo(out) if os.environ.get("EDITKIT_DEMO_EDIT", "1") != "0" else True
    paths = []
    import importlib.util
    spec = importlib.util.spec_from_file_location("editkit_shipped", os.path.join(ROOT, "runner", "shipped.py"))
    shipped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped)    # no ComfyUI boot needed to find the files
    index = shipped.index()
    names = os.environ.get("EDITKIT_DEMO", "").split() or DEMO_WORKFLOWS
    if names == ["all"]:
        names = sorted(index)
    for name in names:
        wf = index[name]
        toy = [] if name.startswith("toy_") else ["--model", "toy"]
        print(f"[demo] running {os.path.relpath(wf, ROOT)} {' '.join(toy)}...", flush=True)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "editkit_run.py"), wf, "--out", out,
                               "--quiet", *toy], capture_output=True, text=True, cwd=ROOT)
        try:
            summary = json.loads(proc.stdout[proc.stdout.index("{"):])
        except ValueError:
            print(proc.stderr[-3000:], file=sys.stderr)
            ok = False
            continue
        ok &= bool(summary["success"])
        for line in proc.stderr.splitlines():
            if line.startswith("editkit-run:"):
                print(f"[demo]   {line}", file=sys.stderr)
        paths += summary["outputs"]
        print(f"[demo]   {'ok' if summary['success'] else 'FAILED'} in {summary['total_time']} s")
    print("[demo] images:")
    for p in paths:
        print("   ", os.path.relpath(p, ROOT))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
