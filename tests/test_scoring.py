"""The one scorer of the quality tables (toyworld/scoring.py), tested against rendered ground truth:
a perfect edit passes, the unedited source fails, and so do a moved, re-drawn-elsewhere, resized or
erased object, a changed bystander and an extra object; drags, prompts with regions, predicted masks,
an extended vocabulary and the Wilson interval against an independent implementation."""
import numpy as np
import pytest
import torch

from editkit.toyworld import editbench, scoring, world


def _erase(scene, index):
    """The scene without object `index` (what an edit that paints the object into the background gives)."""
    objs = tuple(o for i, o in enumerate(scene.objects) if i != index)
    return world.Scene(scene.background, objs, scene.seed, scene.size, scene.vocab)


def _with_extra(scene, obj):
    return world.Scene(scene.background, scene.objects + (obj,), scene.seed, scene.size, scene.vocab)


@pytest.fixture(scope="module")
def cases():
    return editbench.edit_cases(48)


def test_cases_fill_every_split_from_few_sources(cases):
    again = editbench.edit_cases(48)
    assert [c.name for c in cases] == [c.name for c in again] and cases == again
    counts = {}
    for c in cases:
        counts[c.split] = counts.get(c.split, 0) + 1
    assert counts == {"colour near": 48, "colour far": 48, "shape circle<->square": 48,
                      "shape circle<->triangle": 48, "shape square<->triangle": 48}
    seeds = [c.seed for c in cases]
    assert len(set(seeds)) == 72                                   # 24 sources per shape, two swaps each
    for x in set(seeds):                                           # each source's cases are contiguous
        idx = [i for i, s in enumerate(seeds) if s == x]
        assert idx == list(range(idx[0], idx[-1] + 1))
    for c in cases:                                                # grouped by source, trained captions only
        so, to = c.source.objects[0], c.target.objects[0]
        assert (so.x, so.y, so.size) == (to.x, to.y, to.size) and c.source.background == c.target.background
        assert (so.color != to.color) == (c.kind == "colour") and (so.shape != to.shape) == (c.kind == "shape")
        assert not world.is_held_out(so.color, so.shape, c.source.background)
        assert not world.is_held_out(to.color, to.shape, c.target.background)
        near = np.linalg.norm(world.color_rgb(so.color) - world.color_rgb(to.color)) < scoring.NEAR_RGB
        assert c.split == ("colour near" if near else "colour far") or c.kind == "shape"


def test_perfect_edit_scores_100_and_the_source_0(cases):
    perfect = [c.score(torch.from_numpy(c.target.render())) for c in cases]
    assert all(s.ok and s.why == "" for s in perfect) and all(s.preserve_psnr == float("inf") for s in perfect)
    assert scoring.rate(s.ok for s in perfect).value == 1.0
    # a new shape may also sit on the source's centre of mass instead of filling its box (a triangle's
    # centroid is lower in its box than a circle's): still in place
    centred = [(c, scoring.centred_footprint(c.source, c.target, 0)) for c in cases if c.kind == "shape"]
    centred = [(c, alt) for c, alt in centred if alt is not None]
    assert len(centred) >= 48
    for c, alt in centred:
        s = c.score(alt.render())
        assert s.ok and s.footprint == "centroid" and s.preserve_psnr == float("inf")
    unedited = [c.score(c.source.render()) for c in cases]
    assert scoring.rate(s.ok for s in unedited).value == 0.0
    assert not any(s.position_free for s in unedited)


def _clear_of(scene, obj, px=4):
    m = scoring.dilate(world.coverage(obj, scene.size) > 0, px)
    return not any((m & g).any() for g in scene.masks())


def test_moved_redrawn_resized_or_erased_objects_fail(cases):
    def corner(c, size):
        o = c.target.objects[0]
        return world.ToyObject(o.shape, o.color, 3 if o.x + o.size / 2 > 64 else 125 - size,
                               3 if o.y + o.size / 2 > 64 else 125 - size, size)
    c = next(c for c in cases if c.kind == "colour" and c.source.objects[0].size >= 50
             and c.target.objects[0].x + c.target.objects[0].size + 10 <= 125 and _clear_of(c.target, corner(c, 28)))
    o = c.target.objects[0]
    moved = c.target.with_object(0, x=o.x + 10)
    s = c.score(moved.render())
    assert not s.ok and s.position_free and "moved" in s.why and abs(s.edited.centroid_error - 10) < 0.5
    # re-drawn elsewhere: the old (position-free) reading passes, the position-aware one fails
    k = corner(c, 28)
    far = c.target.with_object(0, x=k.x, y=k.y, size=k.size)
    s = c.score(far.render())
    assert not s.ok and s.position_free and "nothing at its place" in s.why
    shrunk = c.target.with_object(0, x=o.x + o.size // 4, y=o.y + o.size // 4, size=o.size // 2)
    assert not c.score(shrunk.render()).ok
    erased = c.score(_erase(c.target, 0).render())
    assert not erased.ok and not erased.position_free and "nothing at its place" in erased.why
    # a copy left in a corner is an extra object
    s = c.score(_with_extra(c.target, world.ToyObject("square", o.color, k.x, k.y, k.size)).render())
    assert s.edited.ok and not s.ok and "extra object" in s.why
    # a changed background fails
    bg = next(b for b in world.COLOR_NAMES if b not in (c.source.background, o.color))
    assert not c.score(world.Scene(bg, c.target.objects, size=c.target.size).render()).ok


def test_local_edit_keeps_the_other_object():
    cases = editbench.edit_cases(6, n_objects=2)
    assert all(len(c.source.objects) == 2 for c in cases)
    for c in cases[:12]:
        j = 1 - c.index
        assert c.score(c.target.render()).ok
        other = c.target.objects[j]
        new = next(col for col in world.COLOR_NAMES
                   if col not in (c.target.background, other.color, c.target.objects[c.index].color))
        bystander = c.target.with_object(j, color=new)
        s = c.score(bystander.render())
        assert s.edited.ok and not s.others_ok and not s.ok
        assert not c.score(_erase(c.target, j).render()).ok


def test_two_edits_in_one_pass():
    """score_edits: both edited objects must reach their targets (a half-done edit fails and says which
    object), the bystander rule still holds for the rest, and a reshaped object may sit on its centred
    footprint; score_edit is score_edits of one object."""
    cases = editbench.double_edit_cases(6)
    assert len({c.seed for c in cases}) == 6
    for c in cases:
        a, b = c.source.objects, c.target.objects
        assert a[0].color != b[0].color and a[0].shape == b[0].shape
        assert a[1].shape != b[1].shape and a[1].color == b[1].color
        assert b[0].color not in (c.source.background, b[1].color)
        perfect = c.score(c.target.render())
        assert perfect.ok and perfect.edited_ok == [True, True] and perfect.preserve_psnr == float("inf")
        source = c.score(c.source.render())
        assert not source.ok and source.edited_ok == [False, False]
        half = c.score(c.source.with_object(0, color=b[0].color).render())      # only the colour edit done
        assert not half.ok and half.edited_ok == [True, False] and half.why.startswith(b[1].phrase)
        alt = scoring.centred_footprint(c.source, c.target, 1)
        if alt is not None:
            s = c.score(alt.render())
            assert s.ok and s.footprint == "box+centroid"
        one = scoring.score_edits(c.target.render(), c.source, c.source.with_object(0, color=b[0].color), (0,))
        single = scoring.score_edit(c.target.render(), c.source, c.source.with_object(0, color=b[0].color), 0)
        assert (one.ok, one.footprint, one.preserve_psnr) == (single.ok, single.footprint, single.preserve_psnr)
        assert not one.ok and not one.others_ok                                 # object 1 reshaped: not kept


def test_drag_scores():
    cases = editbench.drag_cases(16)
    assert cases == editbench.drag_cases(16)
    # eight directions, 45 degrees apart, in turn; a block of two-object scenes, then one of one-object scenes
    angles = [round(np.degrees(np.arctan2(c.target.objects[c.index].y - c.source.objects[c.index].y,
                                          c.target.objects[c.index].x - c.source.objects[c.index].x))) % 360 for c in cases]
    assert angles == [45 * (k % 8) for k in range(16)]
    assert [len(c.source.objects) for c in cases] == [2] * 8 + [1] * 8
    for c in cases:
        o, t = c.source.objects[c.index], c.target.objects[c.index]
        shift = np.hypot(t.x - o.x, t.y - o.y)
        assert 16 <= shift <= 40
        if len(c.source.objects) == 2:
            assert not (c.target.masks()[0] & c.target.masks()[1]).any()
        good = c.score(c.target.render())
        assert good.ok and good.centroid_error < 0.5 and good.preserve_psnr == float("inf")
        still = c.score(c.source.render())
        assert not still.ok and abs(still.centroid_error - shift) < 1.0
        half = c.source.with_object(c.index, x=(o.x + t.x) // 2, y=(o.y + t.y) // 2)
        assert not c.score(half.render()).ok
        assert c.score(half.render(), tolerance=20).ok                   # within a looser tolerance
        copy = _with_extra(c.target, o)                                   # dragged, but a copy stayed behind
        if not (c.target.masks()[c.index] & c.source.masks()[c.index]).any():
            s = c.score(copy.render())
            assert not s.ok and "extra object" in s.why
        if len(c.source.objects) == 2:
            other = c.target.objects[1 - c.index]
            bumped = c.target.with_object(1 - c.index, y=other.y + (8 if other.y < 64 else -8))
            assert not c.score(bumped.render()).ok
        taken = {t.color, c.target.background} | {p.color for p in c.target.objects}
        recoloured = c.target.with_object(c.index, color=next(x for x in world.COLOR_NAMES if x not in taken))
        assert not c.score(recoloured.render()).ok
        assert "vanished" in c.score(_erase(c.target, c.index).render()).why


def test_prompt_scores_with_regions():
    for seed in range(20):
        sc = world.sample_scene(700 + seed, n_objects=2)
        img = sc.render()
        assert scoring.score_prompt(img, sc.caption).ok
        boxes = [o.box for o in sc.objects]
        assert scoring.score_prompt(img, sc.caption, regions=boxes).ok
        assert scoring.score_prompt(img, sc, regions=[sc.masks()[0], None]).ok
        swapped = scoring.score_prompt(img, sc.caption, regions=boxes[::-1])
        assert not swapped.ok and swapped.position_free and "outside its region" in swapped.why
        one = world.caption_for(sc.background, [(sc.objects[0].color, sc.objects[0].shape)])
        s = scoring.score_prompt(img, one)
        assert not s.ok and not s.count_ok
        missing = scoring.score_prompt(_erase(sc, 1).render(), sc.caption)
        assert not missing.ok
    single = world.sample_scene(5, n_objects=1)
    o = single.objects[0]
    other = world.caption_for(single.background, [(next(c for c in world.COLOR_NAMES
                                                        if c not in (o.color, single.background)), o.shape)])
    assert not scoring.score_prompt(single.render(), other).ok


def test_mask_iou_takes_comfy_masks_at_any_size():
    sc = world.sample_scene(11, n_objects=1)
    gt = sc.masks()[0]
    assert scoring.mask_iou(torch.from_numpy(gt.astype(np.float32))[None], gt) == 1.0
    small = torch.nn.functional.interpolate(torch.from_numpy(gt.astype(np.float32))[None, None], size=(16, 16),
                                            mode="area")[0]
    assert 0.8 < scoring.mask_iou(small, gt) < 1.0                 # a latent-size mask, upsampled nearest
    assert scoring.mask_iou(np.zeros_like(gt), gt) == 0.0
    assert scoring.mask_iou(np.ones_like(gt), gt) == pytest.approx(gt.sum() / gt.size)


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest
    for k, n in ((0, 10), (10, 10), (30, 48), (1, 48), (47, 48), (24, 48), (102, 130)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert scoring.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert scoring.wilson(0, 0) == (0.0, 1.0)
    r = scoring.Rate(30, 48)
    assert str(r) == "62 % [48–75] (30/48)" and r.record()["n"] == 48
    assert str(scoring.Rate(0, 0)) == "n/a"
    t = scoring.tally([{"s": "a", "success": True}, {"s": "a", "success": False}, {"s": "b", "success": True}],
                      key=lambda r: r["s"])
    assert t == {"a": scoring.Rate(1, 2), "b": scoring.Rate(1, 1)}


def test_splits():
    assert scoring.color_split("red", "orange") == "near" and scoring.color_split("blue", "purple") == "near"
    assert scoring.color_split("red", "blue") == "far" and scoring.color_split("white", "yellow") == "far"
    assert scoring.shape_pair("triangle", "circle") == scoring.shape_pair("circle", "triangle") == "circle<->triangle"


def test_vocabulary_extends_without_changing_the_base():
    def star(u, v):   # a plus sign inscribed in the box: no base template fits it
        return ((np.abs(u - 0.5) <= 0.17) | (np.abs(v - 0.5) <= 0.17)) & (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    vocab = world.BASE.with_color("teal", (0, 150, 150)).with_shape("plus", star)
    assert world.BASE.color_names == world.COLOR_NAMES and world.BASE.shape_names == list(world.SHAPES)
    with pytest.raises(ValueError, match="from"):
        world.BASE.with_color("crimson", (210, 30, 40))       # too close to red to read
    with pytest.raises(ValueError, match="taken"):
        world.BASE.with_shape("circle", star)
    sc = world.Scene("white", (world.ToyObject("plus", "teal", 30, 30, 60),), size=128, vocab=vocab)
    assert sc.caption == "a teal plus on a white background"
    assert world.parse_caption(sc.caption, vocab) == sc.spec
    with pytest.raises(ValueError):
        world.parse_caption(sc.caption)
    img = sc.render()
    assert scoring.score_prompt(img, sc).ok and scoring.score_scene(img, sc).ok
    # the base vocabulary cannot name the concept, so it does not read it as taught
    assert not scoring.score_prompt(img, world.caption_for("white", [("green", "square")])).ok
    edit = sc.with_object(0, color="red")
    assert edit.vocab is vocab and editbench.EditCase("x", sc, edit, "colour", 0).score(edit.render()).ok
    # base scenes read the same with the extended vocabulary
    for s in range(30):
        base = world.sample_scene(s)
        assert scoring.score_scene(base.render(), base, vocab).ok


def test_prompt_score_on_a_cluttered_picture():
    """More than six objects read: pairing falls back to greedy and still finds the asked ones."""
    objs = tuple(world.ToyObject("square", c, 4 + 30 * (i % 4), 4 + 40 * (i // 4), 22)
                 for i, c in enumerate(["red", "blue", "green", "black", "orange", "purple", "yellow"]))
    sc = world.Scene("white", objs)
    s = scoring.score_prompt(sc.render(), world.caption_for("white", [("green", "square"), ("purple", "square")]),
                             regions=[objs[2].box, objs[5].box])
    assert [f.color for f in s.found] == ["green", "purple"] and all(s.in_region) and not s.count_ok and not s.ok


def test_seam_difference_on_rendered_ground_truth():
    img = world.sample_scene(3, n_objects=1).render()
    pano = np.concatenate([img, img, img], axis=1)                       # tiled: the border columns of a plain background
    at, inside = scoring.seam_difference(pano, [128, 256])
    assert at <= 3 * inside + 1e-3                                        # no seam beyond the picture's own edges
    stepped = pano.copy()
    stepped[:, 128:] = np.clip(stepped[:, 128:] + 0.2, 0, 1)              # a brightness step at x = 128
    at2, inside2 = scoring.seam_difference(stepped, [128, 256])
    assert at2 > 0.09 and abs(inside2 - inside) < 1e-2
