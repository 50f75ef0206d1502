"""SEGA (Brack et al. 2023) as a guidance term of EditKitGuider: checked against the paper's formula computed in
the test on the recorded predictions of every call (concept branch batched with cond and uncond), for EPS and
flow models, with add and remove concepts, warm-up and momentum; and its bad inputs."""
import pytest
import torch

import test_guidance as TG
from editkit.core.errors import EditKitInputError
from editkit.guidance import terms as T
from editkit.nodes import guidance as N
from ek_helpers import node_out


def _reference(rec, w, concepts):
    """Final x0 per call: CFG in x0, then for each concept (scale, threshold, reverse, warmup, s_m, beta) its
    masked noise-space difference with momentum, applied after warm-up (x0 = x0 - sigma * gamma)."""
    velocity = [None] * len(concepts)
    out = []
    for k, (x, sigma, preds) in enumerate(rec):
        c, u = preds[0].double(), preds[1].double()
        s = sigma.double().view(-1, 1, 1, 1)
        x0 = u + w * (c - u)
        for j, (scale, thr, reverse, warmup, sm, beta) in enumerate(concepts):
            e = preds[2 + j].double()
            g = scale * ((x.double() - e) / s - (x.double() - u) / s) * (-1 if reverse else 1)
            mask = torch.zeros_like(g)
            for b in range(g.shape[0]):
                for ch in range(g.shape[1]):
                    q = torch.quantile(g[b, ch].abs().flatten(), thr)
                    mask[b, ch] = (g[b, ch].abs() >= q).double()
            gamma = g * mask + (0 if velocity[j] is None else sm * velocity[j])
            velocity[j] = (1 - beta) * gamma if velocity[j] is None else beta * velocity[j] + (1 - beta) * gamma
            if k >= warmup:
                x0 = x0 - s * gamma
        out.append(x0)
    return out


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_sega_matches_the_paper_formula(kind, tiny_eps, tiny_flow, encode):
    model = tiny_eps if kind == "eps" else tiny_flow
    pos, neg = encode("a red circle on a white background"), encode("blurry, dark")
    add, remove = encode("a blue square"), encode("a red circle")
    w = 5.0
    terms = [T.SEGATerm(concept=add, scale=5.0, warmup=2, edit_threshold=0.9, momentum_scale=0.3, momentum_beta=0.6),
             T.SEGATerm(concept=remove, reverse=True, scale=3.0, warmup=0, edit_threshold=0.5, momentum_scale=0.5,
                        momentum_beta=0.4)]
    rec, seen = TG._recorded(model, pos, neg, terms, w)
    assert all(len(p) == 4 for _, _, p in rec)          # cond, uncond and both concepts in ONE batched call
    ref = _reference(rec, w, [(5.0, 0.9, False, 2, 0.3, 0.6), (3.0, 0.5, True, 0, 0.5, 0.4)])
    for got, want in zip(seen, ref):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    plain = TG._recorded(model, pos, neg, [], w)[1]
    assert float((seen[-1] - plain[-1]).abs().max()) > 1e-3     # the concepts moved the result


def test_sega_node_and_bad_inputs(encode):
    c = encode("glasses")
    terms = node_out(N.TermSEGA.execute(c, "remove", 5.0, 10, 0.95, 0.3, 0.6))[0]
    assert len(terms) == 1 and terms[0].reverse and terms[0].label() == "SEGA (remove)"
    with pytest.raises(EditKitInputError, match="'concept'.*not a CONDITIONING"):
        N.TermSEGA.execute("glasses", "add", 5.0, 10, 0.95, 0.3, 0.6)
    with pytest.raises(EditKitInputError, match="'threshold'.*(outside|above the maximum)"):
        N.TermSEGA.execute(c, "add", 5.0, 10, 1.5, 0.3, 0.6)
