"""The EditKit branch contract: which rows of a model call belong to which branch (its one owner).

An EditKit branch sampler (samplers/branch_guider.BranchGuider: inversion editing, reconstruction)
evaluates several branches of one edit in one batched model call. Inside every cond_or_uncond chunk
the branches are stacked in the order named by `transformer_options[BRANCHES_KEY]` (today always
("source", "target")), each branch holding the whole latent batch. Without that key the batch is a
"generated pair": row 0 of each chunk is the source, the other rows are targets (batched generation
with attention control).

After the model call the guider guides each branch separately through ComfyUI's `cfg_function`,
so `sampler_cfg_function` / `sampler_post_cfg_function` consumers see one branch at a time; the
guider names it in `transformer_options[CURRENT_KEY]` of the model_options those functions get
(`current_branch(args)` reads it).

Every reader of the layout (attention controller and techniques, map capture, the guiders,
Prompt-to-Prompt's local blend) imports these names from here: spelling the key elsewhere is a bug.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SOURCE, TARGET = "source", "target"
BRANCHES_KEY = "editkit_branches"     # transformer_options: branch names, stacked in this order per chunk
CURRENT_KEY = "editkit_branch"        # transformer_options seen by cfg_function / post_cfg: the branch guided now
DEFAULT_BRANCHES = (SOURCE, TARGET)


@dataclass(frozen=True)
class Chunk:
    """One cond_or_uncond chunk of a model call: rows [start, start + size)."""
    start: int
    size: int
    cond: bool
    source: tuple          # absolute rows of the source branch
    pairs: tuple           # ((target_row, source_row, target_index), ...)

    @property
    def targets(self) -> list[int]:
        return [p[0] for p in self.pairs]


def branch_layout(cond_or_uncond, batch: int, branches=None) -> list[Chunk]:
    """Split a batch of `batch` rows into chunks and branches (see the module docstring)."""
    cou = list(cond_or_uncond) if cond_or_uncond is not None else [0]
    if not cou or batch % len(cou):
        cou = [0]
    size = batch // len(cou)
    names = list(branches) if branches else None
    chunks = []
    for ci, c in enumerate(cou):
        start = ci * size
        if names and len(names) > 1 and size % len(names) == 0:
            per = size // len(names)
            si = names.index(SOURCE) if SOURCE in names else 0
            src = tuple(start + si * per + j for j in range(per))
            pairs = []
            for bi in range(len(names)):
                if bi == si:
                    continue
                pairs += [(start + bi * per + j, start + si * per + j, j) for j in range(per)]
            chunks.append(Chunk(start, size, c == 0, src, tuple(pairs)))
        else:
            chunks.append(Chunk(start, size, c == 0, (start,), tuple((start + j, start, j - 1) for j in range(1, size))))
    return chunks


def latent_layout(batch: int, branches=None) -> Chunk:
    """The branch layout of a latent batch (as the sampler holds it: one chunk)."""
    return branch_layout([0], batch, branches)[0]


def target_rows(chunks: list[Chunk], cond_only: bool = False) -> list[int]:
    return [r for c in chunks if c.cond or not cond_only for r in c.targets]


# ---------------------------------------------------------------------------------------------
# Reading and writing the contract
# ---------------------------------------------------------------------------------------------

def branches_of(transformer_options: Optional[dict]) -> Optional[tuple]:
    """The branch names a branch sampler declared for this call (None: a generated pair)."""
    names = (transformer_options or {}).get(BRANCHES_KEY)
    return tuple(names) if names else None


def chunks_of(transformer_options: Optional[dict], batch: int) -> list[Chunk]:
    """The chunks of a model call of `batch` rows, from its transformer_options."""
    to = transformer_options or {}
    return branch_layout(to.get("cond_or_uncond"), batch, to.get(BRANCHES_KEY))


def pairs_of(transformer_options: Optional[dict], batch: int) -> list[tuple]:
    """Every (target_row, source_row, target_index) of a model call."""
    return [p for c in chunks_of(transformer_options, batch) for p in c.pairs]


def _with_options(model_options: dict, **entries) -> dict:
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    to.update(entries)
    mo["transformer_options"] = to
    return mo


def with_branches(model_options: dict, names=DEFAULT_BRANCHES) -> dict:
    """A copy of model_options declaring the branches stacked in each chunk of the next model call."""
    return _with_options(model_options, **{BRANCHES_KEY: tuple(names)})


def with_current(model_options: dict, name: str) -> dict:
    """A copy of model_options telling cfg_function / post_cfg consumers which branch they see."""
    return _with_options(model_options, **{CURRENT_KEY: name})


def current_branch(args: dict) -> Optional[str]:
    """In a sampler_cfg_function / post_cfg function: the branch being guided (None outside a branch sampler)."""
    return (args.get("model_options") or {}).get("transformer_options", {}).get(CURRENT_KEY)
