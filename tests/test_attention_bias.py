"""attention/bias.py: the extra-channel trick gives exactly softmax(q k^T * scale + bias) v through a plain kernel."""
import math

import pytest
import torch

from editkit.attention import bias as AB


def _kernel(qa, ka, va, scale=None):
    """A plain attention kernel on (B, L, H, d): scale defaults to 1/sqrt(head size), as ComfyUI's do."""
    t = lambda x: x.transpose(1, 2)
    return t(torch.nn.functional.scaled_dot_product_attention(t(qa), t(ka), t(va), scale=scale))


@pytest.mark.parametrize("scale", [None, 0.3])
def test_per_key_bias_and_lowrank_bias_are_exact(scale):
    g = torch.Generator().manual_seed(0)
    b, lq, lk, h, d, r = 2, 5, 7, 3, 16, 3
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    s = scale if scale is not None else 1 / math.sqrt(d)
    ref = lambda bias: torch.einsum("bhqk,bkhd->bqhd", torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * s
                                                                     + bias[:, None], -1), v)
    per_key = torch.randn(1, lk, generator=g, dtype=torch.float64) * 3
    qa, ka, va = AB.bias_augment(q, k, v, per_key, scale)
    assert qa.shape[-1] % 8 == 0
    out = _kernel(qa, ka, va, scale)
    torch.testing.assert_close(out[..., :d], ref(per_key[:, None, :].expand(b, lq, lk)))
    assert out[..., d:].abs().max() == 0
    qf = torch.randn(b, lq, r, generator=g, dtype=torch.float64)
    kf = torch.randn(b, lk, r, generator=g, dtype=torch.float64)
    qa, ka, va = AB.lowrank_augment(q, k, v, qf, kf, scale)
    torch.testing.assert_close(_kernel(qa, ka, va, scale)[..., :d], ref(qf @ kf.transpose(1, 2)))
