"""The inversion-method registry (see base.py for what a method and a replay hook implement).

`get_method(inv.method)` gives the method object of a trajectory; importing this package registers the
built-in methods. A new method: a subclass of InversionMethod decorated with @register in a module
imported here (DEVELOPERS.md, "Adding an inversion method / a replay hook")."""
from .base import (InversionMethod, InversionResult, InversionRun, Params, ReplayContext, ReplayHook,  # noqa: F401
                   ReplayState, SnapSource, Step, get_method, method_names, register)
from . import ode, exact  # noqa: F401,E402  (registers ddim, npi, nti, rf, edict, ddpm)
