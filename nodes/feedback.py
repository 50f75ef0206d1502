"""What EditKit nodes show on the canvas after a run: measurements and saved paths as text, heat maps,
plots and masks as an image preview on the node that made them (they stay IMAGE/MASK outputs too).

A node returns `io.NodeOutput(..., ui=feedback.show(cls, text=..., images=...))` and declares what it
shows in `EDITKIT_SHOWS` ("text", "image"): the front-end extension (web/editkit.js) puts the text in a
read-only box on the node, the front end draws the preview, and the workflow layout leaves room for both.
"""
from __future__ import annotations

from .api import ui


def show(cls, text: str | None = None, images=None, masks=None) -> dict:
    """The `ui` of a NodeOutput: {"text": [text]} and a preview's {"images": [...]} (temp files)."""
    out = {}
    if images is not None:
        out.update(ui.PreviewImage(images, cls=cls).as_dict())
    elif masks is not None:
        out.update(ui.PreviewMask(masks, cls=cls).as_dict())
    if text is not None:
        out.update(ui.PreviewText(text).as_dict())
    return out
