"""`make demo`: run the example workflows headless with editkit-run and collect the images in out/."""
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The workflows `make demo` runs (names in workflows/); EDITKIT_DEMO="a.json b.json" or "all" overrides.
DEMO_WORKFLOWS = ["sdedit.json", "attention_maps.json"]


def main():
    out = os.path.join(ROOT, "out")
    os.makedirs(out, exist_ok=True)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    common = open(os.path.join(ROOT, "scripts", "workflow_defs", "common.py")).read()
    if "EditKitTinyModelLoader" in common:
        print("[demo] model: EditKit's tiny model built in code with RANDOM weights (no trained model in the repo yet):\n"
              "[demo] the images show that the graphs run end to end, not what the techniques look like.")
    ok = True
    paths = []
    names = os.environ.get("EDITKIT_DEMO", "").split() or DEMO_WORKFLOWS
    if names == ["all"]:
        names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "workflows", "*.json")))
    for name in names:
        wf = os.path.join(ROOT, "workflows", name)
        print(f"[demo] running {os.path.relpath(wf, ROOT)} ...", flush=True)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "editkit_run.py"), wf, "--out", out, "--quiet"],
                              capture_output=True, text=True, cwd=ROOT)
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
