// EditKit front-end extension "editkit.drag": the point editor of "EditKit Drag Points".
// The node's `points` widget keeps the JSON of EDITKIT_DRAG (drag/points.py): the editor reads it and
// writes it back, so the workflow saves the points, the API takes the same JSON, and the canvas redraws
// them on load. The editor shows the image connected to the node (the nearest node upstream that shows
// one, e.g. Load Image; cropped to the declared aspect ratio as Image Scale's "center" crop does), or a
// blank canvas of the declared size.
//  * Points mode: click a handle on the object, click again for its target (an arrow is drawn); repeat.
//  * Paint / Erase: brush the editable region (round dabs of the chosen radius, in image pixels).
//  * Undo reverts the last click or brush stroke; Clear removes every point and the region.
// All state lives in this module (no globals); tests reach it through app.extensions (name
// "editkit.drag", field `drag`).
import { app } from "../../scripts/app.js";

const NAME = "editkit.drag";
const NODE = "EditKitDragPoints";
const EDITOR = "editkit_drag_editor";        // the DOM widget (not serialized)
const HANDLE = "#ff4d4d";
const TARGET = "#4da3ff";
const REGION = "rgba(255, 214, 64, 0.38)";

const KEY = Symbol(NAME);                    // a node's editor, kept on the node itself

function round(v) {
  return Math.round(v * 10) / 10;
}

function parse(text) {
  try {
    const d = JSON.parse(text);
    if (!d || typeof d !== "object" || Array.isArray(d)) return null;
    const w = Number(d.width), h = Number(d.height);
    if (!(w >= 1 && h >= 1)) return null;
    const xy = (p) => (Array.isArray(p) ? [Number(p[0]), Number(p[1])] : [Number(p?.x), Number(p?.y)]);
    const points = (Array.isArray(d.points) ? d.points : []).map((p) => Array.isArray(p)
      ? { handle: xy(p[0]), target: xy(p[1]) } : { handle: xy(p.handle), target: xy(p.target) });
    const strokes = (Array.isArray(d.mask?.strokes) ? d.mask.strokes : []).map((s) => [
      Number(s[0]), Number(s[1]), Number(s[2]), s.length > 3 ? (s[3] ? 1 : 0) : 1]);
    return { width: Math.round(w), height: Math.round(h), points, strokes };
  } catch (e) {
    return null;
  }
}

function serialize(d) {
  const out = { version: 1, width: d.width, height: d.height,
    points: d.points.map((p) => ({ handle: p.handle.map(round), target: p.target.map(round) })) };
  if (d.strokes.length) out.mask = { strokes: d.strokes.map((s) => [round(s[0]), round(s[1]), round(s[2]), s[3]]) };
  return JSON.stringify(out);
}

// The image the points are placed on: this node's own preview, else the nearest upstream node showing one
// (following IMAGE inputs).
function sourceImage(node) {
  const seen = new Set();
  let n = node;
  for (let depth = 0; n && depth < 12 && !seen.has(n.id); depth++) {
    seen.add(n.id);
    const img = n.imgs?.[0];
    if (img && img.complete && img.naturalWidth > 0) return img;
    const input = (n.inputs || []).find((i) => i.type === "IMAGE" && i.link != null);
    if (!input) return null;
    const link = n.graph?.links?.[input.link] ?? n.graph?.links?.get?.(input.link);
    n = link ? n.graph.getNodeById(link.origin_id) : null;
  }
  return null;
}

class Editor {
  constructor(node) {
    this.node = node;
    this.mode = "points";
    this.radius = 0;                          // brush radius in image pixels (0: a default from the size)
    this.pending = null;                      // a handle waiting for its target
    this.history = [];                        // [json, pending] before each action
    this.drawn = "";
    this.stroke = null;

    const root = document.createElement("div");
    root.className = "editkit-drag";
    root.style.cssText = "display:flex;flex-direction:column;width:100%;height:100%;gap:3px;font:11px sans-serif;";
    const bar = document.createElement("div");
    bar.style.cssText = "display:flex;gap:3px;align-items:center;flex-wrap:nowrap;";
    const button = (name, label, title, fn) => {
      const b = document.createElement("button");
      b.textContent = label;
      b.title = title;
      b.dataset.editkit = name;
      b.style.cssText = "padding:1px 6px;border-radius:4px;border:1px solid #556;background:#2a2f3a;color:#ddd;cursor:pointer;";
      b.addEventListener("click", (e) => { e.stopPropagation(); fn(); });
      bar.appendChild(b);
      return b;
    };
    this.buttons = {
      points: button("points", "Points", "Click a handle, then its target", () => this.setMode("points")),
      paint: button("paint", "Paint", "Paint the editable region", () => this.setMode("paint")),
      erase: button("erase", "Erase", "Erase from the editable region", () => this.setMode("erase")),
    };
    const size = document.createElement("input");
    size.type = "range";
    size.min = "1";
    size.max = "100";
    size.title = "Brush radius (% of the image's shorter side / 2)";
    size.dataset.editkit = "radius";
    size.style.cssText = "width:60px;";
    size.addEventListener("input", () => { this.radius = Number(size.value) / 200 * this.shortSide(); });
    bar.appendChild(size);
    this.size = size;
    button("undo", "Undo", "Undo the last click or brush stroke", () => this.undo());
    button("clear", "Clear", "Remove every point and the region", () => this.clear());
    const canvas = document.createElement("canvas");
    canvas.style.cssText = "flex:1 1 auto;min-height:0;width:100%;cursor:crosshair;touch-action:none;";
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    canvas.addEventListener("pointerup", (e) => this.up(e));
    canvas.addEventListener("pointerleave", (e) => this.up(e));
    root.appendChild(bar);
    root.appendChild(canvas);
    this.root = root;
    this.canvas = canvas;
    this.setMode("points");
  }

  get widget() {
    return this.node.widgets?.find((w) => w.name === "points");
  }

  data() {
    return parse(this.widget?.value ?? "");
  }

  shortSide() {
    const d = this.data();
    return d ? Math.min(d.width, d.height) : 512;
  }

  brush() {
    return this.radius > 0 ? this.radius : this.shortSide() / 8;
  }

  setMode(mode) {
    this.mode = mode;
    for (const [name, b] of Object.entries(this.buttons)) b.style.background = name === mode ? "#47607e" : "#2a2f3a";
    if (!this.radius) this.size.value = String(Math.round(this.brush() / this.shortSide() * 200));
  }

  write(d) {
    const w = this.widget;
    if (!w) return;
    const text = serialize(d);
    w.value = text;
    w.callback?.(text);
    this.redraw(true);
    this.node.setDirtyCanvas?.(true, true);
  }

  remember() {
    this.history.push([this.widget?.value ?? "", this.pending]);
    if (this.history.length > 200) this.history.shift();
  }

  undo() {
    const last = this.history.pop();
    if (!last) return;
    this.pending = last[1];
    const w = this.widget;
    if (w) { w.value = last[0]; w.callback?.(last[0]); }
    this.redraw(true);
    this.node.setDirtyCanvas?.(true, true);
  }

  clear() {
    const d = this.data();
    if (!d) return;
    this.remember();
    this.pending = null;
    this.write({ ...d, points: [], strokes: [] });
  }

  // canvas layout: the image's box inside the canvas (contain), in CSS pixels of the canvas
  box(d) {
    const cw = this.canvas.clientWidth, ch = this.canvas.clientHeight;
    const s = Math.min(cw / d.width, ch / d.height);
    return { x: (cw - d.width * s) / 2, y: (ch - d.height * s) / 2, s };
  }

  toImage(e, d) {
    const r = this.canvas.getBoundingClientRect();
    const k = r.width > 0 ? this.canvas.clientWidth / r.width : 1;        // the canvas may be zoomed (CSS transform)
    const b = this.box(d);
    const x = ((e.clientX - r.left) * k - b.x) / b.s, y = ((e.clientY - r.top) * k - b.y) / b.s;
    return [x, y];
  }

  // screen (client) position of an image point: for tests and scripts
  toScreen(x, y) {
    const d = this.data();
    if (!d) return null;
    const r = this.canvas.getBoundingClientRect();
    const k = this.canvas.clientWidth > 0 ? r.width / this.canvas.clientWidth : 1;
    const b = this.box(d);
    return [r.left + (b.x + x * b.s) * k, r.top + (b.y + y * b.s) * k];
  }

  down(e) {
    e.stopPropagation();
    e.preventDefault();
    if (e.button !== 0) return;
    const d = this.data();
    if (!d) return;
    const [x, y] = this.toImage(e, d);
    if (!(x >= 0 && y >= 0 && x < d.width && y < d.height)) return;
    if (this.mode === "points") {
      this.remember();
      if (this.pending) {
        d.points.push({ handle: this.pending, target: [x, y] });
        this.pending = null;
        this.write(d);
      } else {
        this.pending = [x, y];
        this.redraw(true);
      }
      return;
    }
    this.remember();
    this.stroke = d;
    this.canvas.setPointerCapture?.(e.pointerId);
    this.dab(x, y);
  }

  dab(x, y) {
    const d = this.stroke;
    const r = this.brush();
    const last = d.strokes[d.strokes.length - 1];
    if (this.stroke.started && last && Math.hypot(last[0] - x, last[1] - y) < r / 3) return;
    this.stroke.started = true;
    d.strokes.push([x, y, r, this.mode === "paint" ? 1 : 0]);
    this.write(d);
  }

  move(e) {
    if (!this.stroke) return;
    e.stopPropagation();
    const [x, y] = this.toImage(e, this.stroke);
    this.dab(x, y);
  }

  up(e) {
    if (!this.stroke) return;
    this.stroke = null;
    this.canvas.releasePointerCapture?.(e.pointerId);
  }

  // Redraw when the JSON, the image or the canvas size changed (called from the node's draw hook).
  redraw(force = false) {
    const text = this.widget?.value ?? "";
    const img = sourceImage(this.node);
    const cw = this.canvas.clientWidth, ch = this.canvas.clientHeight;
    const key = [text, img?.src ?? "", cw, ch, JSON.stringify(this.pending)].join("|");
    if (!force && key === this.drawn) return;
    this.drawn = key;
    const dpr = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(cw * dpr) || this.canvas.height !== Math.round(ch * dpr)) {
      this.canvas.width = Math.max(1, Math.round(cw * dpr));
      this.canvas.height = Math.max(1, Math.round(ch * dpr));
    }
    const g = this.canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, cw, ch);
    const d = parse(text);
    if (!d) {
      g.fillStyle = "#c88";
      g.fillText("not valid drag JSON: fix it in the text box", 6, 14);
      return;
    }
    const b = this.box(d);
    const W = d.width * b.s, H = d.height * b.s;
    g.fillStyle = "#202020";
    g.fillRect(b.x, b.y, W, H);
    if (img) {   // cover-crop to the declared aspect ratio (Image Scale's "center" crop)
      const a = d.width / d.height, ia = img.naturalWidth / img.naturalHeight;
      let sw = img.naturalWidth, sh = img.naturalHeight;
      if (ia > a) sw = sh * a; else sh = sw / a;
      g.drawImage(img, (img.naturalWidth - sw) / 2, (img.naturalHeight - sh) / 2, sw, sh, b.x, b.y, W, H);
    } else {
      g.fillStyle = "#888";
      g.fillText(`${d.width}x${d.height} (connect an image)`, b.x + 6, b.y + 14);
    }
    if (d.strokes.length) {   // the region: dabs in order (paint adds, erase removes), drawn translucent
      const m = document.createElement("canvas");
      m.width = Math.max(1, Math.round(W));
      m.height = Math.max(1, Math.round(H));
      const mg = m.getContext("2d");
      for (const [x, y, r, paint] of d.strokes) {
        mg.globalCompositeOperation = paint ? "source-over" : "destination-out";
        mg.fillStyle = "#fff";
        mg.beginPath();
        mg.arc(x * b.s, y * b.s, r * b.s, 0, 2 * Math.PI);
        mg.fill();
      }
      mg.globalCompositeOperation = "source-in";
      mg.fillStyle = REGION;
      mg.fillRect(0, 0, m.width, m.height);
      g.drawImage(m, b.x, b.y, W, H);
    }
    const at = (p) => [b.x + p[0] * b.s, b.y + p[1] * b.s];
    const dot = (p, color) => {
      const [x, y] = at(p);
      g.fillStyle = color;
      g.strokeStyle = "#fff";
      g.lineWidth = 1.5;
      g.beginPath();
      g.arc(x, y, 4.5, 0, 2 * Math.PI);
      g.fill();
      g.stroke();
    };
    d.points.forEach((p, i) => {
      const [x0, y0] = at(p.handle), [x1, y1] = at(p.target);
      const ang = Math.atan2(y1 - y0, x1 - x0);
      g.strokeStyle = "#fff";
      g.lineWidth = 2;
      g.beginPath();
      g.moveTo(x0, y0);
      g.lineTo(x1, y1);
      g.lineTo(x1 - 9 * Math.cos(ang - 0.45), y1 - 9 * Math.sin(ang - 0.45));
      g.moveTo(x1, y1);
      g.lineTo(x1 - 9 * Math.cos(ang + 0.45), y1 - 9 * Math.sin(ang + 0.45));
      g.stroke();
      dot(p.handle, HANDLE);
      dot(p.target, TARGET);
      g.fillStyle = "#fff";
      g.fillText(String(i + 1), x0 + 6, y0 - 6);
    });
    if (this.pending) dot(this.pending, HANDLE);
  }
}

function editorOf(id) {
  return app.graph?.getNodeById(Number(id))?.[KEY] ?? null;
}

const extension = {
  name: NAME,
  drag: {
    editor: editorOf,
    toScreen: (id, x, y) => editorOf(id)?.toScreen(x, y) ?? null,
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const ed = new Editor(this);
      this[KEY] = ed;
      const widget = this.addDOMWidget(EDITOR, "editkit_drag_editor", ed.root, {
        serialize: false,
        getValue: () => undefined,
        setValue: () => {},
        getMinHeight: () => 200,
      });
      widget.serialize = false;
      this.setSize?.([Math.max(this.size[0], 320), Math.max(this.size[1], this.computeSize()[1])]);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      const ed = this[KEY];
      if (ed) { ed.history = []; ed.pending = null; ed.redraw(true); }     // a loaded workflow: its points
      return r;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function () {
      const r = onDrawForeground?.apply(this, arguments);
      this[KEY]?.redraw();
      return r;
    };
  },
};

app.registerExtension(extension);
