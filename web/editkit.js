// EditKit front-end extension: marks EditKit nodes on the canvas and exposes a small API the
// browser tests (and users' scripts) can check: window.EditKit.
import { app } from "../../scripts/app.js";

const EDITKIT_COLOR = "#2b3d52";
const EDITKIT_BGCOLOR = "#1d2836";

window.EditKit = Object.assign(window.EditKit || {}, {
  version: "0.1.0",
  loaded: true,
  // Node ids registered by the back end, filled in when node definitions arrive.
  nodes: [],
});

app.registerExtension({
  name: "EditKit.core",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("EditKit")) return;
    window.EditKit.nodes.push(nodeData.name);
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      // A quiet, consistent colour so EditKit nodes are easy to spot in large graphs.
      if (!this.color) this.color = EDITKIT_COLOR;
      if (!this.bgcolor) this.bgcolor = EDITKIT_BGCOLOR;
      return r;
    };
  },
});
