"""The edit-quality benchmark's plumbing (bench/quality.py, toyworld/editbench.py, toyworld/shipped.py):
shipped settings are read from the workflow files by node type and input name and fail clearly when
missing; rows follow the workflows; a row's cells trace to its per-case records; the README block is
rewritten between its markers only. No sampling here: the full measurement is `make bench-quality`."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

from editkit.runner.shipped import path as _shipped_path
from editkit.toyworld import editbench, scoring, shipped
from editkit.toyworld.shipped import Setting, ShippedSettingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("editkit_bench_quality", os.path.join(ROOT, "bench", "quality.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _widget(path, node_type, index):
    with open(path) as f:
        data = json.load(f)
    return next(n for n in data["nodes"] if n["type"] == node_type)["widgets_values"][index]


def test_reads_settings_by_node_type_and_input_name():
    wf = _shipped_path("sdedit")
    got = shipped.read_settings({"strength": Setting("sdedit.json", "EditKitSDEdit", "strength"),
                                 "cfg": Setting("sdedit.json", "CFGGuider", "cfg"),
                                 "sampler": Setting("sdedit.json", "KSamplerSelect", "sampler_name")})
    # independent reading of the saved widget values (EditKitSDEdit: strength is its first widget)
    assert got == {"strength": _widget(wf, "EditKitSDEdit", 0), "cfg": _widget(wf, "CFGGuider", 0),
                   "sampler": _widget(wf, "KSamplerSelect", 0)}
    assert shipped.read_setting(Setting("attention_p2p_inverted.json", "EditKitPromptToPrompt", "local_blend_words",
                                        convert=bool)) is True


def test_missing_workflow_node_or_input_fails_clearly(tmp_path):
    with pytest.raises(ShippedSettingError, match="id 'nope', which does not ship"):
        shipped.read_setting(Setting("nope.json", "KSampler", "steps"))
    with pytest.raises(ShippedSettingError, match="sdedit.json has no EditKitInvert node"):
        shipped.read_setting(Setting("sdedit.json", "EditKitInvert", "steps"))
    with pytest.raises(ShippedSettingError, match="no input 'nonsense'"):
        shipped.read_setting(Setting("sdedit.json", "EditKitSDEdit", "nonsense"))
    # two nodes of the type that disagree need a title to pick one
    src = _shipped_path("sdedit")
    with open(src) as f:
        data = json.load(f)
    node = next(n for n in data["nodes"] if n["type"] == "CFGGuider")
    twin = json.loads(json.dumps(node))
    twin["id"], twin["widgets_values"], twin["title"] = 999, [9.0], "Second guider"
    for inp in twin.get("inputs", []):
        inp["link"] = None
    twin["outputs"] = [dict(o, links=[]) for o in twin.get("outputs", [])]
    data["nodes"].append(twin)
    (tmp_path / "two.json").write_text(json.dumps(data))
    with pytest.raises(ShippedSettingError, match="different cfg"):
        shipped.read_setting(Setting("two.json", "CFGGuider", "cfg"), workflows_dir=str(tmp_path))
    assert shipped.read_setting(Setting("two.json", "CFGGuider", "cfg", title="Second guider"),
                                workflows_dir=str(tmp_path)) == 9.0


def test_every_technique_reads_its_shipped_workflows(quality):
    """Each row's shipped settings come from existing workflow files and have the reference's keys, so the
    two can be compared (this fails, naming the file and node, when a workflow stops shipping a setting)."""
    ctx = editbench.EditContext(None, None, None)
    for tech in editbench.TECHNIQUES.values():
        if tech.calibration:
            assert tech.shipped is None
            continue
        assert tech.shipped is not None and tech.shipped_from, tech.name
        ship = tech.shipped()
        for ref in tech.reference(ctx):
            assert set(ship) == set(ref), (tech.name, set(ship) ^ set(ref))
        rows = editbench.rows_for(ctx, tech)
        assert [r.which for r in rows].count("shipped") + [r.which for r in rows].count("reference = shipped") == 1


def test_shipped_rows_follow_the_workflow(quality, tmp_path, monkeypatch):
    for name in os.listdir(shipped.WORKFLOWS_DIR):
        if name.endswith(".json"):
            shutil.copy(os.path.join(shipped.WORKFLOWS_DIR, name), tmp_path / name)
    sdedit = tmp_path / os.path.basename(_shipped_path("sdedit"))   # found by its id, whatever its title
    with open(sdedit) as f:
        data = json.load(f)
    node = next(n for n in data["nodes"] if n["type"] == "EditKitSDEdit")
    node["widgets_values"][0] = 0.5            # strength 0.5
    node["widgets_values"][1] = 10             # 10 steps: the reference t0 = 0.5 row
    guider = next(n for n in data["nodes"] if n["type"] == "CFGGuider")
    guider["widgets_values"][0] = 5.0          # CFG 5, the reference's
    sdedit.write_text(json.dumps(data))
    monkeypatch.setattr(shipped, "WORKFLOWS_DIR", str(tmp_path))
    ctx = editbench.EditContext(None, None, None)
    rows = editbench.rows_for(ctx, editbench.TECHNIQUES["SDEdit"])
    assert [r.which for r in rows] == ["reference = shipped", "reference", "reference"]
    assert rows[0].label == "t0 0.5, 10 steps, CFG 5"
    sdedit.unlink()
    with pytest.raises(ShippedSettingError, match="sdedit"):
        editbench.rows_for(ctx, editbench.TECHNIQUES["SDEdit"])


def test_a_row_traces_to_its_cases(quality, tmp_path, monkeypatch):
    """run_row + summarize on the ground-truth calibration with a stand-in VAE: every cell is recomputable
    from the per-case CSV, the time counts only calls that missed the memo, and the README block is
    rewritten between the markers only."""
    cases = editbench.edit_cases(4)

    class IdentityVAE:
        def encode(self, x):
            return x.clone()

        def decode(self, z):
            return z.clone()

    ctx = editbench.EditContext(None, None, IdentityVAE())
    calls = []

    def memo_runner(ctx, case, prompt, s):
        ctx.memo(("inv", case.seed), lambda: calls.append(case.seed) or case.seed)
        return torch.from_numpy(case.target.render() if prompt == case.target_prompt else case.source.render())

    tech = editbench.Technique("stand-in", memo_runner)
    row = editbench.Row(tech, {"steps": 3}, "reference", ("steps",))
    result = editbench.run_row(ctx, row, cases, n_recon=2)
    assert calls == sorted({c.seed for c in cases}, key=[c.seed for c in cases].index)   # one miss per source
    assert len(result["seconds"]) == len(calls) and len(result["recon"]) == 2
    s = editbench.summarize(row, result, plain_seconds=1.0)
    assert s["cells"]["edit success"] == str(scoring.Rate(len(cases), len(cases)))
    assert s["rates"]["colour near"]["n"] == 4 and s["cells"]["recon PSNR (dB)"] == "inf"

    monkeypatch.setattr(quality, "RESULTS", str(tmp_path / "q"))
    s["cases_file"] = quality.write_cases(s, result["records"])
    import csv
    with open(tmp_path / "q" / s["cases_file"]) as f:
        recs = list(csv.DictReader(f))
    assert len(recs) == len(cases) and all(r["success"] == "True" for r in recs)
    assert {r["split"] for r in recs} == {"colour near", "colour far"} | {"shape " + p.split(" ", 1)[1]
                                                                          for p in editbench.shape_splits()}
    data = {"rows": [dict(s, shipped_from=[])], "cases": {"n": len(cases), "sources": 3, "per_split": {"colour near": 4}},
            "settings": {"steps": 20, "cfg": 5.0, "n_recon": 2, "iou_min": 0.7, "near_rgb": 0.7, "preserve_dilate": 3},
            "date": "today", "machine": "test", "run_minutes": 1.0}
    quality.save_summary(data)
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{quality.MARK_BEGIN}\nold table\n{quality.MARK_END}\nafter\n")
    quality.write_readme(data, str(readme))
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old table" not in text
    assert "| stand-in | reference: 3 steps | 100 % [" in text


def test_drag_rows_run_on_the_same_machinery():
    """A drag table reuses run_row/summarize: a runner that moves the object passes, one that leaves it fails."""
    cases = editbench.drag_cases(8)
    ctx = editbench.EditContext(None, None, None)

    def mover(ctx, case, prompt, s):
        return torch.from_numpy((case.target if s["move"] else case.source).render())

    tech = editbench.Technique("stand-in drag", mover)
    for move, k in ((True, 8), (False, 0)):
        row = editbench.Row(tech, {"move": move}, "reference", ("move",))
        s = editbench.summarize(row, editbench.run_row(ctx, row, cases, n_recon=0), 1.0, success="drag success",
                                groups={})
        assert s["rates"]["drag success"]["k"] == k and s["rates"]["drag success"]["n"] == 8
        assert set(s["rates"]) == {"drag success"} | {c.split for c in cases}
        assert (float(s["cells"]["centroid error (px)"]) < 0.5) == move      # triangles read within 0.3 px


def _personalization_module():
    spec = importlib.util.spec_from_file_location("editkit_bench_pers",
                                                  os.path.join(ROOT, "bench", "quality_personalization.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_personalization_concepts_are_new_and_read_back(tmp_path):
    """The personalization table's concepts: the star, pink and teal are not in the base vocabulary, their
    rendered training images (and a two-concept ground truth) score as right with the extended vocabulary and
    as wrong with the base one; the README block is rewritten between its markers only."""
    from editkit.toyworld import world
    mod = _personalization_module()
    assert "star" not in world.BASE.shape_names
    assert "teal" not in world.BASE.color_names and "pink" not in world.BASE.color_names
    for scenes, vocab in ((mod.training_scenes(6), mod.VOCAB),
                          (mod.colour_scenes(mod.FIRST_COLOR, mod.FIRST_SHAPE, 3), mod.VOCAB2),
                          (mod.colour_scenes(mod.SECOND_COLOR, mod.SECOND_SHAPE, 3), mod.VOCAB2)):
        for s in scenes:
            assert s.background in mod.TRAIN_BACKGROUNDS and s.background not in mod.EVAL_BACKGROUNDS
            assert scoring.score_prompt(s.render(), s, vocab=vocab).ok
            assert not scoring.score_prompt(s.render(), s.spec, vocab=world.BASE).ok
    pair = world.Scene("green", (world.ToyObject("circle", "pink", 5, 30, 50),
                                 world.ToyObject("square", "teal", 70, 30, 45)), 0, 128, mod.VOCAB2)
    assert scoring.score_prompt(pair.render(), pair, vocab=mod.VOCAB2).ok
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\nafter\n")
    data = {"rows": [{"method": "m", "settings": "s", "concept": "1 %", "prior": "p", "train_seconds": 1.0,
                      "peak_rss_mb": 2.0, "loss": [0.1, 0.05]}], "images": 6, "eval": 16, "prior_n": 12,
            "sample_steps": 20, "cfg": 5.0}
    mod.write_readme(data, str(readme))
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text and "| m | s | 1 % |" in text
    # a --methods subset replaces only its own rows, in table order
    old = [{"method": "Custom Diffusion", "v": 1}, {"method": "textual inversion", "v": 1}]
    merged = mod.merge_rows(old, [{"method": "core TrainLoraNode", "v": 2}, {"method": "textual inversion", "v": 2}])
    assert [(r["method"], r["v"]) for r in merged] == [("textual inversion", 2), ("core TrainLoraNode", 2),
                                                       ("Custom Diffusion", 1)]


def test_personalization_stars_survive_the_toy_vae():
    """The star's training size is one the toy VAE keeps: every training image, encoded and decoded, still
    reads as an orange star on its background (at the toy world's own sizes most read as circles)."""
    from editkit.builtin_models import toy
    if not toy.available():
        pytest.skip("the shipped toy model is not built")
    import numpy as np
    mod = _personalization_module()
    _, _, vae = toy.load_toy()
    scenes = mod.training_scenes(6)
    with torch.inference_mode():
        rec = vae.decode(vae.encode(torch.from_numpy(np.stack([s.render() for s in scenes])).float())).float().numpy()
    for s, img in zip(scenes, rec):
        assert scoring.score_prompt(img, s.spec, vocab=mod.VOCAB).ok
