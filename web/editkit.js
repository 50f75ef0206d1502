// EditKit front-end extension "editkit.core". It keeps all state in this module (no globals) and touches
// only EditKit's own node types and the Load Image nodes of EditKit's workflows:
//  * EditKit nodes get a quiet colour, and the text a node sends after a run (measurements, saved paths:
//    nodes/feedback.py) appears in a read-only box on that node; image previews are the front end's own.
//  * When a workflow names one of EditKit's example images (web/examples/) that the server's input folder
//    lacks, it is uploaded there (as the Load Image upload button does), so a template runs as opened.
// Tests read the extension's state from app.extensions (name "editkit.core", field `editkit`).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NAME = "editkit.core";
const BASE = new URL(".", import.meta.url);          // /extensions/<this pack's folder>/, whatever it is called
const COLOR = "#2b3d52";
const BGCOLOR = "#1d2836";
const INFO = "editkit_info";                          // the text box widget (not serialized)
const EXAMPLE = /^editkit_example[\w-]*\.png$/;

const state = { loaded: true, nodes: [], uploaded: [], shown: {} };

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === INFO);
  if (!widget) {
    const box = document.createElement("textarea");
    box.readOnly = true;
    box.spellcheck = false;
    box.style.cssText = "width:100%;height:100%;resize:none;font:11px monospace;opacity:0.85;" +
      "background:transparent;color:inherit;border:1px solid #556;border-radius:4px;padding:2px 4px;";
    widget = node.addDOMWidget(INFO, "editkit_info", box, {
      serialize: false,
      getValue: () => box.value,
      setValue: (v) => { box.value = v ?? ""; },
      getMinHeight: () => 44,
      getMaxHeight: () => 90,
    });
    widget.serialize = false;
  }
  widget.element.value = text;
  state.shown[node.id] = text;
  node.setDirtyCanvas?.(true, true);
}

async function provideExample(name) {
  const file = await fetch(new URL("examples/" + encodeURIComponent(name), BASE));
  if (!file.ok) return false;
  const body = new FormData();
  body.append("image", new File([await file.blob()], name, { type: "image/png" }));
  body.append("type", "input");
  const res = await api.fetchApi("/upload/image", { method: "POST", body });
  return res.status === 200;
}

const extension = {
  name: NAME,
  editkit: state,

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("EditKit")) return;
    state.nodes.push(nodeData.name);
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      // A quiet, consistent colour so EditKit nodes are easy to spot in large graphs.
      if (!this.color) this.color = COLOR;
      if (!this.bgcolor) this.bgcolor = BGCOLOR;
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) showText(this, Array.isArray(text) ? text.join("\n") : String(text));
      return r;
    };
  },

  async loadedGraphNode(node) {
    if (node.type !== "LoadImage") return;
    const widget = node.widgets?.find((w) => w.name === "image");
    const name = widget?.value;
    if (typeof name !== "string" || !EXAMPLE.test(name)) return;
    const values = typeof widget.options?.values === "function" ? widget.options.values() : widget.options?.values;
    if (Array.isArray(values) && values.includes(name)) return;
    if (!(await provideExample(name))) return;
    state.uploaded.push(name);
    if (Array.isArray(widget.options?.values) && !widget.options.values.includes(name)) widget.options.values.push(name);
    widget.value = name;
    widget.callback?.(name);                          // Load Image shows the picture
  },
};

app.registerExtension(extension);
