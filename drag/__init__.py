"""Drag editing: the EDITKIT_DRAG value (points.py) and the drag methods (sde_drag.py, ...)."""
