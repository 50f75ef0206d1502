"""The point editor of "EditKit Drag Points" (web/editkit_drag.js) in real Chromium on the real server,
used as a person would: the shipped SDE-Drag workflow on the toy model with a toy-world photo, clicks on
the node place a handle and its target, Undo takes a click back, a brush stroke paints the editable
region; the widget value and the saved workflow hold the points, and a run queued from the page moves the
object (scored against the world's ground truth with toyworld/scoring.py).

Shares the server and the browser set-up of tests/test_browser.py. Screenshots: <pytest tmp>/browser-shots/.
"""
import base64
import io
import json
import os
import urllib.request

import numpy as np
import pytest

from ek_server import TEST_MAX_STEPS
from test_browser import APPLY_PLAN, close_dialogs, comfy_server, drop_file, object_info, page, shots  # noqa: F401

pytestmark = pytest.mark.browser

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


def test_points_placed_on_the_node_move_the_object(page, comfy_server, object_info, shots):  # noqa: F811
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
