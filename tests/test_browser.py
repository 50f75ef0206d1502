"""The real ComfyUI front end in a real browser (Debian's chromium through playwright), served by
the real server with EditKit installed: every file in workflows/ is dropped onto the canvas,
renders without a missing-node dialog or JS errors, keeps a clean layout, gets its example image
uploaded by EditKit's extension, and converts to the same API prompt (with _meta titles) as EditKit's
own converter. Several workflows are then run as a user would: pick the model (the toy model in place of
Load Checkpoint, the same changes as `editkit-run --model toy`), press Run, and the results appear on the
nodes (saved images, previews, measurements) with the layout still clean. The drag point editor on
"EditKit Drag Points" is used with the mouse (points, undo, brush) and its points drive a run.

Screenshots: <pytest tmp>/browser-shots/<workflow>.png (pytest keeps the last runs' tmp dirs).
"""
import base64
import glob
import io
import json
import os
import re
import urllib.request

import numpy as np
import pytest

from ek_server import ROOT, TEST_MAX_STEPS, WORKFLOWS, shared_server, stop_shared_server

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
# Workflows run from the page (by id): an edit of the photo, an inversion with its measurements and heat
# map, composable guidance with its plot, and a LoRA merge with its chart and saved path.
RUN_IN_BROWSER = ["sdedit", "inversion_ddim", "guidance_stack", "lora_merge"]
EXTENSION = "() => (window.app?.extensions || []).find(e => e.name === 'editkit.core')"
# Console errors that are the environment, not the page: no network here (blocked calls to the
# registry and model hosts), optional user files that a fresh server does not have (404s).
NOISE = [r"Failed to load resource: the server responded with a status of 404",
         r"violates the following Content Security Policy", r"Refused to connect", r"Failed to fetch",
         r"Error fetching file size"]
# Logged by front end 1.32.9 on every fresh start, with or without custom nodes (checked with
# --disable-all-custom-nodes); tolerated only before the first workflow is loaded.
STARTUP_NOISE = [r"TypeError: Cannot read properties of undefined \(reading 'id'\)"]
SITE = os.path.join(ROOT, ".venv", "lib", "python3.11", "site-packages")


def _missing():
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "python playwright not installed"
    return None


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, request):
    request.addfinalizer(stop_shared_server)
    return shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser-shots", numbered=True)
    print(f"\nbrowser screenshots: {d}")
    return d


class Console:
    """Page errors and console errors, with the environment's noise filtered out."""

    def __init__(self):
        self.entries = []
        self.startup_done = False

    def add(self, kind, text, url=""):
        self.entries.append((kind, text, url))

    def real(self, since=0):
        out = []
        for kind, text, url in self.entries[since:]:
            if kind == "console" and any(re.search(p, text) for p in NOISE):
                continue
            out.append(f"{kind}: {text[:500]} ({url})")
        return out

    def mark(self):
        return len(self.entries)


@pytest.fixture(scope="module")
def page(comfy_server):
    missing = _missing()
    if missing:   # make setup installs both; a browser test that silently skips proves nothing
        pytest.fail(f"{missing}: run `make setup`")
    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
    try:
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        console = Console()
        pg.on("pageerror", lambda e: console.add("pageerror", str(e)))
        pg.on("console", lambda m: console.add("console", m.text, (m.location or {}).get("url", ""))
              if m.type == "error" else None)
        # per-node registry look-ups (the front end asks the registry which pack a node without cnr_id is from)
        pg.node_lookups = []
        pg.on("request", lambda r: pg.node_lookups.append(r.url) if "/comfy-nodes/" in r.url else None)
        pg.goto(comfy_server.url + "/", wait_until="networkidle", timeout=120_000)
        pg.wait_for_function(f"() => window.app && window.app.graph && ({EXTENSION})()", timeout=120_000)
        # The first-run Templates dialog opens a moment after the app: wait for it, close it with Escape.
        try:
            pg.wait_for_selector(".p-dialog", timeout=20_000)
        except Exception:
            pass  # not shown (e.g. a front end that no longer opens it)
        close_dialogs(pg)
        assert not open_dialogs(pg), open_dialogs(pg)
        pg.console = console
        pg.startup_errors = [e for e in console.real() if not any(re.search(p, e) for p in STARTUP_NOISE)]
        yield pg
    finally:
        browser.close()
        pw.stop()


def open_dialogs(pg):
    return pg.evaluate("() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300))")


def drop_file(pg, name, text):
    """Load a workflow the way a drop on the canvas does (app.handleFile with a File)."""
    pg.evaluate("""async ([name, text]) => {
        const f = new File([text], name, {type: 'application/json'});
        await window.app.handleFile(f);
    }""", [name, text])
    pg.wait_for_timeout(300)  # dialogs open asynchronously


_CLOSE_BUTTON = """() => { const d = document.querySelector('.p-dialog'); if (!d) return null;
    const r = d.getBoundingClientRect();
    const bs = Array.from(d.querySelectorAll('button')).map(b => b.getBoundingClientRect())
        .filter(b => b.width > 0 && b.top < r.top + 80).sort((a, b) => b.right - a.right);
    return bs.length ? [bs[0].left + bs[0].width / 2, bs[0].top + bs[0].height / 2] : null; }"""


def close_dialogs(pg):
    """Escape (the documented way); when a dialog ignores it, its top-right close button."""
    for attempt in range(6):
        if not open_dialogs(pg):
            return
        if attempt % 2 == 0:
            pg.keyboard.press("Escape")
        else:
            xy = pg.evaluate(_CLOSE_BUTTON)
            if xy:
                pg.mouse.click(*xy)
        pg.wait_for_timeout(300)


def widget_inputs(info):
    """Names of the inputs that are widgets on the canvas, from an /object_info entry."""
    names = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            t = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("forceInput"):
                continue
            if isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
    return names


# Core nodes whose title front end 1.32.9 takes from its bundled English locale rather than the node
# definition's display name (/object_info): "EmptyHunyuanLatentVideo" for "Empty HunyuanVideo 1.0 Latent".
LOCALE_TITLES = {"EmptyHunyuanLatentVideo"}


def strip_meta(prompt):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def compare_prompts(ours, ref, object_info, meta=True):
    """Differences between our conversion and graphToPrompt's (class, inputs and _meta.title), ignoring
    front-end-only widgets (inputs graphToPrompt sends that the node definition does not have, e.g. SaveGLB's 3D viewer)."""
    diffs = []
    for k in sorted(set(ours) | set(ref)):
        a, b = ours.get(k), ref.get(k)
        if a is None or b is None or a["class_type"] != b["class_type"]:
            diffs.append((k, a, b))
            continue
        info = object_info.get(b["class_type"], {}).get("input", {})
        known = set(info.get("required") or {}) | set(info.get("optional") or {})
        b_inputs = {n: v for n, v in b["inputs"].items() if n in known or n in a["inputs"]}
        title_differs = a.get("_meta") != b.get("_meta") and b["class_type"] not in LOCALE_TITLES
        if a["inputs"] != b_inputs or (meta and title_differs):
            diffs.append((k, a, b))
    return diffs


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get_json("/object_info", timeout=120)


@pytest.fixture(scope="module")
def converter():
    from editkit.runner import workflow
    return workflow


LIVE_LAYOUT = """() => ({nodes: window.app.graph.nodes.map(n => ({id: n.id, type: n.type, pos: [n.pos[0], n.pos[1]],
    size: [n.size[0], n.size[1]], flags: {collapsed: !!n.flags?.collapsed},
    need: n.computeSize ? Array.from(n.computeSize()) : null})),
  groups: (window.app.graph.groups || window.app.graph._groups || []).map(g => ({title: g.title,
    bounding: Array.from(g._bounding || g.bounding), font_size: g.font_size || 24}))})"""


def live_layout_problems(page):
    """layout.check on the canvas as it is now (live positions and sizes), plus nodes whose content
    (widgets) needs more height than they have."""
    from editkit.runner import layout
    live = page.evaluate(LIVE_LAYOUT)
    problems = layout.check(live)
    for n in live["nodes"]:
        if n["need"] and n["need"][1] > n["size"][1] + 1:
            problems.append(f"node {n['id']} ({n['type']}) needs {n['need'][1]:.0f} px, has {n['size'][1]:.0f}")
    return problems


def test_front_end_loads_with_editkit_extension(page, object_info):
    ek = page.evaluate(f"() => ({EXTENSION})().editkit")
    assert ek and ek["loaded"] is True
    served = sorted(k for k in object_info if k.startswith("EditKit"))
    assert sorted(set(ek["nodes"])) == served, "EditKit's extension did not see every EditKit node definition"
    assert page.evaluate("() => typeof window.EditKit") == "undefined", "the extension writes a global"
    assert not page.startup_errors, page.startup_errors
    assert not [e for e in page.console.real() if "/extensions/EditKit/" in e]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_workflow_loads_in_the_front_end(path, page, object_info, converter, shots):
    name = os.path.basename(path)
    text = open(path, encoding="utf-8").read()
    data = json.loads(text)
    mark = page.console.mark()
    drop_file(page, name, text)
    try:
        page.keyboard.press(".")  # fit the whole graph into view for the screenshot
        page.wait_for_timeout(200)
    finally:
        page.screenshot(path=str(shots / (name.removesuffix(".json") + ".png")))
    dialogs = open_dialogs(page)
    close_dialogs(page)
    assert not [d for d in dialogs if re.search(r"missing", d, re.I)], f"{name}: {dialogs}"
    state = page.evaluate("""() => window.app.graph.nodes.map(n => ({
        id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
        has_errors: !!n.has_errors, size: [n.size[0], n.size[1]],
        widgets: (n.widgets || []).map(w => w.name)}))""")
    saved = {n["id"]: n for n in page.evaluate("() => window.app.graph.serialize().nodes")}
    assert len(state) == len(data["nodes"]), f"{name}: {len(state)} nodes on the canvas, {len(data['nodes'])} in the file"
    for node in data["nodes"]:
        live = next(s for s in state if s["id"] == node["id"])
        assert live["registered"] and not live["has_errors"], f"{name}: node {node['id']} ({node['type']}) not rendered: {live}"
        assert live["size"][0] > 0 and live["size"][1] > 0
        if node["type"] in object_info:
            missing = [w for w in widget_inputs(object_info[node["type"]]) if w not in live["widgets"]]
            assert not missing, f"{name}: node {node['id']} ({node['type']}) has no widget for {missing}"
            # the canvas holds the values the file has (the seed control widget may be added)
            want = node.get("widgets_values") or []
            got = saved[node["id"]].get("widgets_values") or []
            assert got[:len(want)] == want, f"{name}: node {node['id']} widgets {got} != file {want}"
    errors = page.console.real(mark)
    assert not errors, f"{name}: JS errors while loading: {errors}"
    asked = [u for u in page.node_lookups if "/comfy-nodes/EditKit" in u]
    assert not asked, f"{name}: the front end asked the registry about EditKit nodes (no cnr_id?): {asked[:3]}"
    problems = live_layout_problems(page)
    assert not problems, f"{name}: layout on the canvas: {problems}"
    ref = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    ours = converter.to_api(converter.load(path), object_info)
    diffs = compare_prompts(ours, ref, object_info)
    assert not diffs, f"{name}: editkit-run's conversion differs from the front end's Export (API): {diffs[:3]}"


def _templates(object_info):
    out = []
    for p in sorted(glob.glob(os.path.join(SITE, "comfyui_workflow_templates*", "templates", "*.json"))):
        try:
            d = json.load(open(p, encoding="utf-8"))
        except (ValueError, OSError):
            continue
        if not isinstance(d, dict) or not isinstance(d.get("nodes"), list):
            continue
        subs = (d.get("definitions") or {}).get("subgraphs") or []
        sg_ids = {s["id"] for s in subs}
        nodes = list(d["nodes"]) + [n for s in subs for n in s.get("nodes") or []]
        virtual = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
        if all(n["type"] in object_info or n["type"] in sg_ids or n["type"] in virtual for n in nodes):
            out.append((os.path.basename(p), d))
    return out


def test_converter_matches_graph_to_prompt_on_the_template_corpus(page, object_info, converter):
    """An independent reference: the workflow templates shipped with ComfyUI (subgraphs, Reroutes,
    PrimitiveNodes, bypassed nodes), converted by the front end and by editkit-run."""
    templates = _templates(object_info)
    assert templates, "comfyui-workflow-templates (a ComfyUI requirement) is not installed: run `make setup`"
    refs = page.evaluate("""async (wfs) => { const out = {};
        for (const [name, wf] of wfs) {
          try { await window.app.loadGraphData(wf, true, true, name);
                out[name] = (await window.app.graphToPrompt()).output; }
          catch (e) { out[name] = {__error: String(e)}; } }
        return out; }""", [[n, d] for n, d in templates])
    close_dialogs(page)
    bad = {}
    for name, d in templates:
        ref = refs[name]
        if "__error" in ref:
            continue  # the front end itself could not convert it
        ours = converter.ui_to_api(json.loads(json.dumps(d)), object_info)
        diffs = compare_prompts(ours, ref, object_info)
        if diffs:
            bad[name] = diffs[:2]
    compared = sum(1 for n, _ in templates if "__error" not in refs[n])
    assert compared >= 50, f"only {compared} templates compared"
    assert not bad, f"{len(bad)} of {compared} templates convert differently: {json.dumps(bad, default=str)[:3000]}"


APPLY_PLAN = """async (changes) => {
    // What a user does to run the workflow on another model: swap the loader node (links kept, same id)
    // and set widgets - here the changes of `editkit-run --model toy` (runner/substitute.py).
    const graph = window.app.graph;
    for (const c of changes) {
        let node = graph.getNodeById(Number(c.node));
        if (c.type) {
            const outs = (node.outputs || []).map((o, i) => (o.links || []).map(l => {
                const link = graph.links[l] || graph.links.get?.(l); return [i, link.target_id, link.target_slot]; })).flat();
            const pos = [node.pos[0], node.pos[1]], size = [node.size[0], node.size[1]], title = node.title, id = node.id;
            graph.remove(node);
            const fresh = LiteGraph.createNode(c.type);
            fresh.id = id;
            fresh.pos = pos;
            graph.add(fresh);
            fresh.title = title;
            fresh.size = [Math.max(size[0], fresh.size[0]), Math.max(size[1], fresh.size[1])];
            for (const [slot, target, tslot] of outs) {
                const s = c.slots ? (c.slots[slot] ?? c.slots[String(slot)] ?? slot) : slot;
                fresh.connect(s, graph.getNodeById(target), tslot);
            }
            node = fresh;
        }
        for (const [name, value] of Object.entries(c.inputs)) {
            const w = (node.widgets || []).find(w => w.name === name);
            if (w) { w.value = value; w.callback?.(value); }
        }
    }
    graph.setDirtyCanvas(true, true);
}"""


@pytest.mark.parametrize("wid", RUN_IN_BROWSER)
def test_user_runs_a_shipped_workflow_in_the_browser(wid, page, comfy_server, object_info, converter, shots):
    """Load the shipped workflow, pick the model and image, press Run: the result appears on the nodes."""
    import nodes

    from editkit.runner import shipped, substitute
    path = shipped.path(wid)
    data = json.load(open(path, encoding="utf-8"))
    mark = page.console.mark()
    drop_file(page, os.path.basename(path), json.dumps(data))
    close_dialogs(page)
    page.keyboard.press(".")  # fit view: previews are loaded when their node is drawn
    if any(n["type"] == "LoadImage" for n in data["nodes"]):
        # EditKit's extension uploaded the example image the Load Image names (the server's input folder lacks it)
        page.wait_for_function("""() => window.app.graph.nodes.filter(n => n.type === 'LoadImage')
            .every(n => n.imgs && n.imgs.length && n.imgs[0].naturalWidth > 0)""", timeout=60_000, polling=250)
    ours = converter.to_api(data, object_info)
    changes = substitute.plan(ours, substitute.hints(data), "toy", max_steps=TEST_MAX_STEPS)
    page.evaluate(APPLY_PLAN, changes)
    ref = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    expected = substitute.apply(ours, changes)
    assert not compare_prompts(expected, ref, object_info, meta=False), \
        "the graph picked on the page is not the one `editkit-run --model toy` runs"
    assert not any("editkit_info" in v["inputs"] for v in ref.values())
    page.evaluate("async () => await window.app.queuePrompt(0, 1)")  # what the Run button calls
    save_ids = [int(k) for k, v in ref.items() if v["class_type"] == "SaveImage"]
    shows = {int(k): getattr(nodes.NODE_CLASS_MAPPINGS[v["class_type"]], "EDITKIT_SHOWS", ()) for k, v in ref.items()}
    previews = [k for k, s in shows.items() if "image" in s]
    texts = [k for k, s in shows.items() if "text" in s]
    assert save_ids
    try:
        page.wait_for_function("""([ids, previews, texts]) => {
                const g = window.app.graph, ek = (window.app.extensions || []).find(e => e.name === 'editkit.core');
                const shown = id => { const n = g.getNodeById(id);
                    return n && n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; };
                return ids.every(shown) && previews.every(shown) && texts.every(id => ek.editkit.shown[id]); }""",
                               arg=[save_ids, previews, texts], timeout=300_000, polling=500)
        page.wait_for_timeout(500)   # let the canvas lay out what arrived
    finally:
        page.screenshot(path=str(shots / ("run-" + wid + ".png")))
    srcs = page.evaluate("(ids) => ids.map(id => window.app.graph.getNodeById(id).imgs[0].src)", save_ids + previews)
    assert all("/view?" in s for s in srcs), srcs
    assert all("type=output" in s for s in srcs[:len(save_ids)]) and all("type=temp" in s for s in srcs[len(save_ids):])
    boxes = page.evaluate("""(ids) => ids.map(id => { const n = window.app.graph.getNodeById(id);
        const w = (n.widgets || []).find(w => w.name === 'editkit_info'); return w ? w.element.value : null; })""", texts)
    assert all(boxes), f"no text box on {texts}: {boxes}"
    if wid == "inversion_ddim":
        assert re.match(r"PSNR [\d.]+ dB, SSIM [\d.]+", boxes[0]), boxes
    if wid == "lora_merge":
        assert any("saved models/loras/editkit/" in b for b in boxes), boxes
    problems = live_layout_problems(page)
    assert not problems, f"{wid}: layout after the run: {problems}"
    # the text boxes are not saved into the workflow or sent to the server
    after = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert not compare_prompts(ref, after, object_info)
    errors = page.console.real(mark)
    assert not errors, errors


def test_templates_browser_shows_editkit_workflows_with_thumbnails(page, comfy_server):
    """The Templates browser (Workflow > Browse Templates) lists EditKit's workflows under its readable titles,
    each card with its thumbnail loaded."""
    names = sorted(os.path.basename(p)[:-5] for p in WORKFLOWS)
    listed = comfy_server.get_json("/workflow_templates")    # what the browser's template store fetches
    assert sorted(listed.get("EditKit") or []) == names
    urls = page.evaluate("""async (names) => Promise.all(names.map(async n => {
        const img = new Image(); img.src = '/api/workflow_templates/EditKit/' + encodeURIComponent(n) + '.jpg';
        try { await img.decode(); return [img.naturalWidth, img.naturalHeight]; } catch (e) { return null; } }))""", names)
    assert all(u and u[0] >= 128 for u in urls), dict(zip(names, urls))


def test_registry_lookup_check_detects_nodes_without_cnr_id(page):
    """Negative control for the cnr_id check: the same workflow without cnr_id/ver makes the front end ask
    the registry about each EditKit node (https://api.comfy.org/comfy-nodes/<type>/node; unreachable here)."""
    from editkit.runner import shipped
    data = json.load(open(shipped.path("inversion_ddim"), encoding="utf-8"))
    for n in data["nodes"]:
        for key in ("cnr_id", "ver"):
            (n.get("properties") or {}).pop(key, None)
    before = len(page.node_lookups)
    drop_file(page, "no-cnr-id.json", json.dumps(data))
    close_dialogs(page)
    for _ in range(20):
        if any("/comfy-nodes/EditKit" in u for u in page.node_lookups[before:]):
            break
        page.wait_for_timeout(250)
    assert any("/comfy-nodes/EditKit" in u for u in page.node_lookups[before:]), page.node_lookups[before:]


def test_missing_node_dialog_is_detected(page, shots):
    """Negative control: an unknown node type does open the dialog these tests look for."""
    path = WORKFLOWS[0]
    data = json.load(open(path, encoding="utf-8"))
    data["nodes"][0]["type"] = "EditKitNoSuchNodeForTheTest"
    drop_file(page, "unknown.json", json.dumps(data))
    dialogs = open_dialogs(page)
    page.screenshot(path=str(shots / "negative-control-missing-node.png"))
    close_dialogs(page)
    assert any(re.search(r"missing", d, re.I) and "EditKitNoSuchNodeForTheTest" in d for d in dialogs), dialogs


# -- the drag point editor (web/editkit_drag.js) --------------------------------------------------------
# Used as a person would: the shipped SDE-Drag workflow on the toy model with a toy-world photo, clicks on
# the node place a handle and its target, Undo takes a click back, a brush stroke paints the editable
# region; the widget value and the saved workflow hold the points, and a run queued from the page moves
# the object (scored against the world's ground truth with toyworld/scoring.py).

DRAG = "() => (window.app?.extensions || []).find(e => e.name === 'editkit.drag')"


def node_id(pg, ntype):
    return pg.evaluate("(t) => window.app.graph.nodes.find(n => n.type === t).id", ntype)


def points_value(pg, nid):
    return json.loads(pg.evaluate("(id) => window.app.graph.getNodeById(id).widgets.find(w => w.name === 'points').value", nid))


def screen(pg, nid, xy):
    return pg.evaluate(f"([id, x, y]) => ({DRAG})().drag.toScreen(id, x, y)", [nid, float(xy[0]), float(xy[1])])


def press(pg, nid, name):
    """Click a toolbar button of the node's editor (Points, Paint, Erase, Undo, Clear)."""
    box = pg.evaluate(f"""([id, name]) => {{ const b = ({DRAG})().drag.editor(id).root.querySelector(`[data-editkit="${{name}}"]`);
        const r = b.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; }}""", [nid, name])
    pg.mouse.click(*box)


def test_drag_points_placed_on_the_node_move_the_object(page, comfy_server, object_info, shots):
    from editkit.runner import shipped, substitute, workflow
    from editkit.toyworld import editbench
    from PIL import Image

    assert page.evaluate(f"() => !!({DRAG})()"), "the editkit.drag extension is not loaded"
    assert page.evaluate("() => typeof window.EditKitDrag") == "undefined"
    mark = page.console.mark()
    case = editbench.drag_cases(1)[0]            # two objects; one moved by (+23, 0) px
    src = (case.source.render() * 255).round().astype(np.uint8)
    name = "editkit_test_drag_source.png"
    png = io.BytesIO()
    Image.fromarray(src).save(png, format="PNG")

    path = shipped.path("sde_drag")
    data = json.load(open(path, encoding="utf-8"))
    drop_file(page, os.path.basename(path), json.dumps(data))
    close_dialogs(page)
    shipped_points = next(n for n in data["nodes"] if n["type"] == "EditKitDragPoints")["widgets_values"][0]
    page.keyboard.press(".")
    page.wait_for_timeout(300)
    key = page.evaluate(f"(id) => ({DRAG})().drag.editor(id).drawn", node_id(page, "EditKitDragPoints"))
    assert key.startswith(shipped_points + "|"), key[:200]      # the editor drew the workflow's points on load
    ours = workflow.to_api(data, object_info)
    changes = substitute.plan(ours, substitute.hints(data), "toy", max_steps=TEST_MAX_STEPS)
    page.evaluate(APPLY_PLAN, changes)
    pts = node_id(page, "EditKitDragPoints")
    size = case.source.objects[case.index].size
    # upload the photo (a toy-world scene, 128 px) as Load Image's upload button does and pick it; describe
    # it in the prompt; a blank drag of its size; SDE-Drag's patch radius as in tests/test_drag.py
    status = page.evaluate("""async ([name, b64, pts, prompt, radius]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const body = new FormData();
        body.append("image", new File([bytes], name, {type: "image/png"}));
        body.append("type", "input");
        body.append("overwrite", "true");
        const res = await window.app.api.fetchApi("/upload/image", {method: "POST", body});
        const g = window.app.graph;
        const li = g.nodes.find(n => n.type === 'LoadImage'), w = li.widgets.find(w => w.name === 'image');
        if (Array.isArray(w.options?.values) && !w.options.values.includes(name)) w.options.values.push(name);
        w.value = name; w.callback?.(name);
        g.nodes.find(n => n.type === 'CLIPTextEncode').widgets.find(w => w.name === 'text').value = prompt;
        const p = g.getNodeById(pts).widgets.find(w => w.name === 'points');
        p.value = JSON.stringify({version: 1, width: 128, height: 128, points: []}); p.callback?.(p.value);
        g.nodes.find(n => n.type === 'EditKitSDEDrag').widgets.find(w => w.name === 'radius').value = radius;
        g.setDirtyCanvas(true, true);
        return [res.status, w.value]; }""", [name, base64.b64encode(png.getvalue()).decode(), pts, case.source_prompt, size * 0.75])
    assert status == [200, name], status
    page.keyboard.press(".")            # the whole graph in view: Load Image shows the photo when drawn
    # the editor draws the connected photo (Load Image -> Image Scale -> this node)
    page.wait_for_function("""([name]) => { const li = window.app.graph.nodes.find(n => n.type === 'LoadImage');
        return li.imgs?.[0]?.naturalWidth > 0 && li.imgs[0].src.includes(name); }""", arg=[name], timeout=30_000)
    page.evaluate("""(id) => { const node = window.app.graph.getNodeById(id), ds = window.app.canvas.ds;
        ds.scale = 1; ds.offset[0] = 80 - node.pos[0]; ds.offset[1] = 140 - node.pos[1];   // the node at 100 % zoom
        window.app.graph.setDirtyCanvas(true, true); }""", pts)
    page.wait_for_timeout(400)
    handle, goal = case.handle, case.goal
    drawn = page.evaluate(f"""([id, x, y]) => {{ const ed = ({DRAG})().drag.editor(id), c = ed.canvas, b = ed.box(ed.data());
        const k = c.width / c.clientWidth;
        const px = c.getContext('2d').getImageData(Math.floor((b.x + x * b.s) * k), Math.floor((b.y + y * b.s) * k), 1, 1).data;
        return [c.clientWidth, c.clientHeight, Array.from(px)]; }}""", [pts, handle[0], handle[1]])
    assert drawn[0] >= 200 and drawn[1] >= 150, drawn
    colour = src[int(handle[1]), int(handle[0])]           # the dragged object's colour: the photo is drawn
    assert np.abs(np.array(drawn[2][:3], dtype=int) - colour).max() <= 12, (drawn, colour)

    # click the handle (a point on the object), then its target
    page.mouse.click(*screen(page, pts, handle))
    assert points_value(page, pts)["points"] == []           # a handle alone is not a pair yet
    page.mouse.click(*screen(page, pts, goal))
    v = points_value(page, pts)
    assert len(v["points"]) == 1 and (v["width"], v["height"]) == (128, 128)
    (hx, hy), (tx, ty) = v["points"][0]["handle"], v["points"][0]["target"]
    assert abs(hx - handle[0]) < 1.5 and abs(hy - handle[1]) < 1.5 and abs(tx - goal[0]) < 1.5 and abs(ty - goal[1]) < 1.5, v
    # a second pair, then Undo twice: its target, then its handle
    page.mouse.click(*screen(page, pts, (10, 10)))
    page.mouse.click(*screen(page, pts, (20, 12)))
    assert len(points_value(page, pts)["points"]) == 2
    press(page, pts, "undo")
    assert len(points_value(page, pts)["points"]) == 1
    press(page, pts, "undo")
    assert points_value(page, pts)["points"] == v["points"]
    page.mouse.click(*screen(page, pts, (30, 100)))          # a new handle, then its target: the undone one is gone
    page.mouse.click(*screen(page, pts, (40, 100)))
    assert [p["handle"] for p in points_value(page, pts)["points"]] == [v["points"][0]["handle"], [30, 100]]
    press(page, pts, "undo")
    press(page, pts, "undo")
    assert points_value(page, pts)["points"] == v["points"]

    # paint the editable region: one stroke from the object to where it goes
    press(page, pts, "paint")
    page.evaluate(f"""([id, r]) => {{ const s = ({DRAG})().drag.editor(id).root.querySelector('[data-editkit="radius"]');
        s.value = String(r); s.dispatchEvent(new Event('input')); }}""", [pts, round(size * 0.8 / 64 * 100)])
    page.mouse.move(*screen(page, pts, handle))
    page.mouse.down()
    for k in range(1, 9):
        page.mouse.move(*screen(page, pts, (handle[0] + (goal[0] - handle[0]) * k / 8, handle[1] + (goal[1] - handle[1]) * k / 8)))
    page.mouse.up()
    v = points_value(page, pts)
    assert len(v["mask"]["strokes"]) >= 3 and all(s[3] == 1 for s in v["mask"]["strokes"]), v
    assert len(v["points"]) == 1
    page.screenshot(path=str(shots / "drag-points-editor.png"))

    # the saved workflow holds the points (and the editor itself is not saved)
    saved = page.evaluate("(id) => window.app.graph.serialize().nodes.find(n => n.id === id)", pts)
    assert json.loads(saved["widgets_values"][0]) == v and len(saved["widgets_values"]) == 1
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert json.loads(prompt[str(pts)]["inputs"]["points"]) == v

    # Run: the saved image has the object moved toward the target
    page.evaluate("async () => await window.app.queuePrompt(0, 1)")
    save = node_id(page, "SaveImage")
    page.wait_for_function("""(id) => { const n = window.app.graph.getNodeById(id);
        return n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; }""",
                           arg=save, timeout=120_000, polling=250)
    page.screenshot(path=str(shots / "drag-points-run.png"))
    url = page.evaluate("(id) => window.app.graph.getNodeById(id).imgs[0].src", save)
    assert "type=output" in url
    with urllib.request.urlopen(url, timeout=30) as r:
        out = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), dtype=np.float32) / 255.0
    before, after = case.score(src / 255.0), case.score(out)
    shift = np.hypot(goal[0] - handle[0], goal[1] - handle[1])
    assert before.centroid_error > shift - 1.0
    assert after.centroid_error < 0.5 * shift, after.why      # the object followed the drag
    errors = page.console.real(mark)
    assert not errors, errors
