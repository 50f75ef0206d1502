"""Control schedules: neutral = ComfyUI bit for bit; schedule, block weights, mask, cond-only and
max-variance fusion change exactly the residuals they claim to; full-size SD1.5 ControlNet runs."""
import pytest
import torch

from editkit.adapters import control as C
from editkit.adapters import demo_models as DM
from editkit.builtin_models import fullsize, tiny
from editkit.core.errors import EditKitInputError
from ek_helpers import node_out, sample_ksampler

TINY = dict(tiny.TINY_UNET, num_heads=2, num_head_channels=-1)


@pytest.fixture(scope="module")
def tiny_cn():
    return DM.controlnet_object(TINY, seed=5, std=0.05)


def hint(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, size, size, 3, generator=g)


def apply(pos, neg, cn, image, strength=1.0, start=0.0, end=1.0):
    import nodes
    return nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cn, image, strength, start, end)


def schedule_node(cn, schedule="constant", s0=1.0, s1=1.0, keyframes="0:1, 1:1", blocks="uniform", ratio=C.SOFT_RATIO,
                  custom="", cond_only=False, combine="sum", mask=None):
    from editkit.nodes.adapters import ControlSchedule
    return node_out(ControlSchedule.execute(cn, schedule, s0, s1, keyframes, blocks, ratio, custom, cond_only, combine,
                                            mask=mask))[0]


def test_neutral_is_bit_identical_to_controlnet_apply_advanced(tiny_eps, encode, tiny_cn):
    pos, neg, lat = encode("a red circle"), encode(""), torch.zeros(1, 4, 8, 8)
    plain = sample_ksampler(tiny_eps, *apply(pos, neg, tiny_cn, hint(), 0.8, 0.0, 0.7), lat, steps=4)
    wrapped = sample_ksampler(tiny_eps, *apply(pos, neg, schedule_node(tiny_cn), hint(), 0.8, 0.0, 0.7), lat, steps=4)
    assert torch.equal(plain, wrapped)
    assert not torch.equal(plain, sample_ksampler(tiny_eps, pos, neg, lat, steps=4))
    # stacked on an earlier control: ComfyUI's sum, same operand order
    p1, n1 = apply(pos, neg, tiny_cn, hint(1), 0.5)
    plain2 = sample_ksampler(tiny_eps, *apply(p1, n1, tiny_cn, hint(), 0.8), lat, steps=3)
    wrapped2 = sample_ksampler(tiny_eps, *apply(p1, n1, schedule_node(tiny_cn), hint(), 0.8), lat, steps=3)
    assert torch.equal(plain2, wrapped2)


class Call:
    """get_control on one control object outside a sampler, as _calc_cond_batch calls it."""

    def __init__(self, model, sigmas, step=0, cou=(1, 0), batch=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.model, self.sigmas = model, sigmas
        n = len(cou) * batch
        self.x = torch.randn(n, 4, 8, 8, generator=g)
        self.t = sigmas[step].repeat(n)
        self.cond = {"c_crossattn": torch.randn(n, 77, 32, generator=g)}
        self.to = {"cond_or_uncond": list(cou), "sample_sigmas": sigmas}
        self.batched = len(cou)

    def __call__(self, control):
        ms = self.model.get_model_object("model_sampling")
        control.pre_run(self.model.model, lambda a: ms.percent_to_sigma(a))
        return control.get_control(self.x, self.t, self.cond, self.batched, self.to)


def prepared(cn, image=None, strength=1.0):
    return cn.copy().set_cond_hint((hint() if image is None else image).movedim(-1, 1), strength, (0.0, 1.0))


@pytest.fixture
def call(tiny_eps):
    from editkit.core import denoiser
    return Call(tiny_eps, denoiser.schedule(tiny_eps, "normal", 4))


def _pairs(a, b):
    for key in a:
        for x, y in zip(a[key], b[key]):
            if x is not None:
                yield key, x, y


def test_block_weights_scale_exactly_their_residuals(tiny_eps, call, tiny_cn):
    plain = call(prepared(tiny_cn))
    n_input = len(tiny_eps.model.diffusion_model.input_blocks)
    assert len(plain["output"]) == n_input and len(plain["middle"]) == 1
    soft = call(prepared(schedule_node(tiny_cn, blocks="soft (ControlNet code)", ratio=0.825)))
    for key, p, s in _pairs(plain, soft):
        j = [i for i, t in enumerate(plain[key]) if t is p][0]
        pos = j if key == "output" else n_input
        assert torch.equal(s, p * (0.825 ** float(n_input - pos))), (key, j)
    assert torch.equal(soft["middle"][0], plain["middle"][0])                     # deepest block: weight 1
    res = call(prepared(schedule_node(tiny_cn, blocks="resolution (paper)")))
    for key, p, r in _pairs(plain, res):
        assert torch.equal(r, p * (4 / p.shape[-2]))                              # 8x8 residuals x 0.5, 4x4 x 1
    custom = [0.0, 0.25, 0.5, 2.0, 3.0]
    cus = call(prepared(schedule_node(tiny_cn, blocks="custom", custom=", ".join(map(str, custom)))))
    for j, (p, c) in enumerate(zip(plain["output"], cus["output"])):
        assert torch.equal(c, p * custom[j])
    assert torch.equal(cus["middle"][0], plain["middle"][0] * 3.0)


def test_t2i_adapter_inputs_weighted_by_the_block_they_reach(call):
    import comfy.controlnet
    import comfy.t2i_adapter.adapter as A
    net = tiny.init_weights(A.Adapter(cin=3 * 64, channels=[32, 64, 64, 64], nums_rb=1, ksize=1, sk=True,
                                      use_conv=False, xl=False), 4)
    t2i = comfy.controlnet.T2IAdapter(net, 3, 8, "nearest-exact", device=torch.device("cpu"))
    plain = call(prepared(t2i))
    soft = call(prepared(schedule_node(t2i, blocks="soft (ControlNet code)", ratio=0.5)))
    n = len(plain["input"])
    for j, (p, s) in enumerate(zip(plain["input"], soft["input"])):
        if p is not None:
            block = n - 1 - j                            # popped from the end by input block 0, 1, ...
            assert torch.equal(s, p * (0.5 ** float(max(4 - block, 0))))


def test_mask_zeroes_residuals_outside(call, tiny_cn):
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    plain = call(prepared(tiny_cn))
    masked = call(prepared(schedule_node(tiny_cn, mask=mask)))
    for key, p, m in _pairs(plain, masked):
        w = p.shape[-1]
        assert torch.equal(m[..., w // 2:], torch.zeros_like(m[..., w // 2:]))
        assert torch.equal(m[..., : w // 2], p[..., : w // 2])


def test_cond_only_zeroes_the_uncond_chunk(tiny_eps, call, tiny_cn):
    plain = call(prepared(tiny_cn))
    only = call(prepared(schedule_node(tiny_cn, cond_only=True)))
    for key, p, o in _pairs(plain, only):               # chunk order [uncond, cond]
        assert torch.equal(o[:1], torch.zeros_like(o[:1])) and torch.equal(o[1:], p[1:])


def test_schedule_follows_the_steps(tiny_eps, tiny_cn):
    from editkit.core import denoiser
    sig = denoiser.schedule(tiny_eps, "normal", 4)
    cn = schedule_node(tiny_cn, schedule="linear", s0=1.0, s1=0.0)
    kf = schedule_node(tiny_cn, schedule="keyframes", keyframes="0:2, 0.5:1, 1:1")
    for step in range(4):
        call = Call(tiny_eps, sig, step=step)
        plain = call(prepared(tiny_cn))
        for control, factor in ((cn, 1.0 - step / 4), (kf, [2.0, 1.5, 1.0, 1.0][step])):
            out = call(prepared(control))
            if factor == 1.0:
                assert all(torch.equal(a, b) for _, a, b in _pairs(plain, out))
            else:
                assert all(torch.equal(b, a * factor) for _, a, b in _pairs(plain, out)), (step, factor)
    # factor 0 skips the control model altogether and passes the earlier controls through
    zero = schedule_node(tiny_cn, schedule="linear", s0=0.0, s1=0.0)
    calls = []
    inner = prepared(zero)
    orig = inner.inner.get_control
    inner.inner.get_control = lambda *a: calls.append(1) or orig(*a)
    assert Call(tiny_eps, sig)(inner) is None and not calls


def test_cosine_and_keyframe_shapes():
    s = C.Schedule("cosine", 1.0, 0.0)
    assert s(0.0) == 1.0 and s(1.0) == 0.0 and s(0.5) == pytest.approx(0.5)
    k = C.Schedule("keyframes", keyframes=C.parse_keyframes("1:0, 0:1, 0.5:0.8"))
    assert k(0.25) == pytest.approx(0.9) and k(0.75) == pytest.approx(0.4)
    with pytest.raises(EditKitInputError, match="keyframes"):
        C.parse_keyframes("0:1, half:2")
    with pytest.raises(EditKitInputError, match="outside"):
        C.parse_keyframes("1.5:1")


def test_max_variance_fusion_picks_per_location(call, tiny_cn):
    first = prepared(tiny_cn, hint(3))
    a = call(prepared(tiny_cn, hint(3)))
    second = prepared(schedule_node(tiny_cn, combine="max variance (MaxFusion)"))
    second.set_previous_controlnet(first)
    fused = call(second)
    b = call(prepared(tiny_cn))
    for key in ("output", "middle"):
        for x, y, f in zip(a[key], b[key], fused[key]):
            take_b = C.relative_std(y) >= C.relative_std(x)
            assert torch.equal(f, torch.where(take_b, y, x))
            assert take_b.any() and (~take_b).any()


def test_errors(tiny_eps, tiny_flux, call, tiny_cn):
    soft = prepared(schedule_node(tiny_cn, blocks="soft (ControlNet code)"))
    with pytest.raises(EditKitInputError, match="block_weights.*DiT"):
        soft.pre_run(tiny_flux.model, lambda a: 1.0)
    with pytest.raises(EditKitInputError, match="custom_weights.*3 weights given.*4 input blocks"):
        call(prepared(schedule_node(tiny_cn, blocks="custom", custom="1, 2, 3")))
    with pytest.raises(EditKitInputError, match="custom_weights"):
        schedule_node(tiny_cn, blocks="custom", custom="1, x")
    with pytest.raises(EditKitInputError, match="control_net"):
        schedule_node(object())


def test_demo_controlnet_file_loads(tiny_eps, encode):
    from editkit.adapters import demo_assets
    from editkit.nodes.adapters import TinyControlNetLoader
    cn = node_out(TinyControlNetLoader.execute(demo_assets.controlnet_file("tiny")))[0]
    pos, neg = apply(encode("a"), encode(""), schedule_node(cn, blocks="soft (ControlNet code)"), hint())
    assert torch.isfinite(sample_ksampler(tiny_eps, pos, neg, torch.zeros(1, 4, 8, 8), steps=2)).all()


@pytest.mark.slow
def test_sd15_full_controlnet_runs_with_each_option(sd15_full):
    """A random ControlNet of the full SD1.5 layout (13 residuals): block weights measured on its real
    residuals, then one sampling step with every option (combined where they are independent)."""
    from editkit.core import denoiser
    cn = DM.controlnet_object(fullsize.SD15_UNET, seed=1, dtype=torch.bfloat16, std=0.01,
                             compute_dtype=fullsize.compute_dtype_of(sd15_full))
    image = hint(size=256)
    call = Call(sd15_full, denoiser.schedule(sd15_full, "normal", 4))
    call.x = torch.randn(2, 4, 32, 32)
    call.cond = {"c_crossattn": torch.randn(2, 77, 768)}
    plain = call(prepared(cn, image))
    assert len(plain["output"]) == 12 and len(plain["middle"]) == 1
    expected = {"soft (ControlNet code)": lambda pos, size: 0.825 ** float(12 - pos),
                "resolution (paper)": lambda pos, size: 4 / size,
                "custom": lambda pos, size: [0.1 * (i + 1) for i in range(13)][pos]}
    custom = ",".join(str(0.1 * (i + 1)) for i in range(13))
    for mode, fn in expected.items():
        out = call(prepared(schedule_node(cn, blocks=mode, custom=custom), image))
        for j, (p, o) in enumerate(zip(plain["output"] + plain["middle"], out["output"] + out["middle"])):
            assert torch.equal(o, p * fn(j, p.shape[-2])), (mode, j)

    pos, neg = fullsize.sd15_conditioning(), fullsize.sd15_conditioning(seed=1)
    lat = torch.zeros(1, 4, 32, 32)
    mask = torch.zeros(1, 256, 256)
    mask[:, 64:192, 64:192] = 1.0
    base = sample_ksampler(sd15_full, *apply(pos, neg, schedule_node(cn), image), lat, steps=1)
    combined = schedule_node(cn, schedule="linear", s0=0.5, s1=0.2, blocks="soft (ControlNet code)", mask=mask,
                             cond_only=True)
    shaped = sample_ksampler(sd15_full, *apply(pos, neg, combined, image), lat, steps=1)
    earlier = apply(pos, neg, cn, hint(7, 256), 0.7)
    summed = sample_ksampler(sd15_full, *apply(*earlier, schedule_node(cn), image), lat, steps=1)
    fused = sample_ksampler(sd15_full, *apply(*earlier, schedule_node(cn, combine="max variance (MaxFusion)"), image),
                            lat, steps=1)
    for out in (base, shaped, summed, fused):
        assert torch.isfinite(out).all()
    assert not torch.equal(shaped, base) and not torch.equal(fused, summed) and not torch.equal(summed, base)


def test_controlnet_loader_hands_other_files_to_comfyui(tmp_path):
    """A ControlNet for a UNet with 64-channel blocks and no EditKit metadata loads through ComfyUI's own loader."""
    import comfy.controlnet
    import comfy.utils
    cfg = dict(TINY, model_channels=64, num_heads=1)
    sd, meta = DM.make_controlnet(cfg, seed=2)
    path = tmp_path / "cn.safetensors"
    comfy.utils.save_torch_file(sd, str(path))
    cn = DM.load_controlnet(str(path))
    assert isinstance(cn, comfy.controlnet.ControlNet)
    comfy.utils.save_torch_file(sd, str(path), metadata=meta)
    assert isinstance(DM.load_controlnet(str(path)), comfy.controlnet.ControlNet)
