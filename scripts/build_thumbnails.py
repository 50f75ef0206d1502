"""Template thumbnails: workflows/<name>.jpg beside each workflows/<name>.json, made from the workflow's
own toy run (`editkit-run --model toy`, the shipped step counts). The Templates browser shows them
(/api/workflow_templates/<pack>/<name>.jpg).

    .venv/bin/python scripts/build_thumbnails.py [id ...]       (about 5 minutes for all on a CPU)

Each JPEG's comment records the hash of the graph it shows (thumbnail_key: the API prompt), so
tests/test_workflows.py fails when a workflow changes and its thumbnail was not rebuilt.
"""
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 256
PREFIX = b"editkit-graph-sha256:"


def thumbnail_key(data: dict, node_classes: dict) -> str:
    """Hash of the graph a thumbnail shows: the API prompt (layout, notes and titles do not count)."""
    from editkit.runner import workflow
    prompt = workflow.ui_to_api(data, node_classes)
    graph = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}
    return hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()


def read_key(path: str) -> str | None:
    from PIL import Image
    comment = Image.open(path).info.get("comment") or b""
    return comment[len(PREFIX):].decode() if comment.startswith(PREFIX) else None


def compose(images) -> "Image.Image":
    """The images of the workflow's last Save Image, side by side, letterboxed into a SIZE x SIZE square."""
    from PIL import Image
    w = sum(i.width for i in images)
    h = max(i.height for i in images)
    strip = Image.new("RGB", (w, h), (24, 24, 28))
    x = 0
    for i in images:
        strip.paste(i.convert("RGB"), (x, (h - i.height) // 2))
        x += i.width
    scale = SIZE / max(w, h)
    strip = strip.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    out = Image.new("RGB", (SIZE, SIZE), (24, 24, 28))
    out.paste(strip, ((SIZE - strip.width) // 2, (SIZE - strip.height) // 2))
    return out


def main(wanted) -> int:
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import build_workflows
    build_workflows.boot()
    import folder_paths
    import nodes
    from PIL import Image

    from editkit.runner import assets, execute, shipped, substitute, workflow
    ok = True
    for wid, path in sorted(shipped.index().items()):
        if wanted and wid not in wanted:
            continue
        data = workflow.load(path)
        prompt = workflow.to_api(data, nodes.NODE_CLASS_MAPPINGS)
        toy = substitute.apply(prompt, substitute.plan(prompt, substitute.hints(data)))
        assets.copy_examples(toy, folder_paths.get_input_directory())
        result = execute.run_prompt(toy)
        if not result.success:
            print(f"FAILED {os.path.basename(path)}: {result.error}", file=sys.stderr)
            ok = False
            continue
        saves = [nid for nid, v in prompt.items() if v["class_type"] == "SaveImage" and nid in result.ui_outputs]
        last = sorted(saves, key=int)[-1]
        out_dir = folder_paths.get_output_directory()
        images = [Image.open(os.path.join(out_dir, i.get("subfolder", ""), i["filename"]))
                  for i in result.ui_outputs[last]["images"]]
        dest = path[:-5] + ".jpg"
        key = thumbnail_key(data, nodes.NODE_CLASS_MAPPINGS).encode()
        compose(images).save(dest, "JPEG", quality=85, optimize=True, comment=PREFIX + key)
        print(f"wrote {os.path.relpath(dest, ROOT)} ({result.total_time:.1f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(set(sys.argv[1:])))
