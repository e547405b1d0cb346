"""Step methods (compute / reuse / taylor1 / taylor2) and block caching in compression plans: defaults, rules,
files, accounting, summary (CPU)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ditfa_jax.configs import FluxConfig
from ditfa_jax.methods import DEFAULT_CANDIDATES, STEP_KINDS, windows_from_choice
from ditfa_jax.plan import CompressionPlan

FLUX = FluxConfig(guidance_embeds=True)          # FLUX.1-dev shape: 19 + 38 layers, 24 heads, head_dim 128
KINDS = ["compute", "compute", "reuse", "compute", "taylor1", "compute", "taylor2", "reuse"]


def head_plan(steps=8, seed=0, **kw):
    """A 1024 px FLUX plan with random head methods after step 0."""
    full = CompressionPlan.full(FLUX, height=1024, width=1024, text_len=512, num_steps=steps)
    choice = np.random.default_rng(seed).integers(-1, len(DEFAULT_CANDIDATES), size=full.shape)
    choice[0] = -1
    return full.replace(head_window=windows_from_choice(choice, DEFAULT_CANDIDATES, full.image_tokens), delta=0.2,
                        **kw)


def cached_blocks(steps=8, layers=57):
    """bool [steps, layers]: the last 40 blocks cached on computed steps 3 and 5 (FBCache-like, F = 17)."""
    bc = np.ones((steps, layers), bool)
    bc[[3, 5], 17:] = False
    return bc


def step_plan():
    return head_plan().replace(step_kind=KINDS, block_compute=cached_blocks())


# --- defaults ------------------------------------------------------------------------------------------------------

def test_defaults_are_todays_meaning():
    p = head_plan()
    assert p.step_kind.dtype == np.int8 and p.step_kind.shape == (8,) and (p.step_kind == 0).all()
    assert p.block_compute.dtype == bool and p.block_compute.shape == (8, 57) and p.block_compute.all()
    assert not p.step_kind.flags.writeable and not p.block_compute.flags.writeable
    assert not p.uses_step_methods and not p.uses_block_caching
    assert p.computed_steps.tolist() == list(range(8)) and p.step_kind_names() == ("compute",) * 8
    assert (p.work_per_step_layer() == 1.0).all() and p.work_per_step_layer().dtype == np.float64
    explicit = p.replace(step_kind=np.zeros(8, np.int8), block_compute=np.ones((8, 57), bool))
    assert explicit == p and explicit.digest() == p.digest() and explicit.to_json() == p.to_json()
    assert list(json.loads(p.to_json())["methods"]) == ["head"]
    assert "steps:" not in p.summary() and "blocks:" not in p.summary()


PLANS = Path(__file__).parent / "fixtures" / "plans"
# digest and sha256(to_json())[:16] of each fixture as the code before step methods (commit 418d953) gave them
BEFORE = {"flux_v1.json": ("56b8cff37b2f8708", "bcf4b8b4f52c865c"),
          "sd3_hilbert_v1.json": ("32a80cdac4f02593", "7a251789e3d2a5a4"),
          "testbed_v1.json": ("89aededef6c7070e", "6e84ae4437ced976")}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_fixtures_keep_digest_and_json(name):
    plan = CompressionPlan.load(PLANS / name)
    digest, text = BEFORE[name]
    assert not plan.uses_step_methods and not plan.uses_block_caching
    assert plan.digest() == digest and hashlib.sha256(plan.to_json().encode()).hexdigest()[:16] == text
    reused = plan.replace(step_kind=["compute"] + ["reuse"] * (plan.num_steps - 1))
    assert reused.digest() != digest and reused.replace(step_kind=None).digest() == digest


# --- the rules -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(step_kind=["reuse"] + ["compute"] * 7), r"step_kind: step 0 must be 'compute' .*got 'reuse'"),
    (dict(step_kind=[0, 2] + [0] * 6), r"step_kind: step 1 is 'taylor1', which needs 2 computed steps before it; "
                                       r"it has 1 \(steps \[0\]\)"),
    (dict(step_kind=[0, 0, 1, 3] + [0] * 4), r"step_kind: step 3 is 'taylor2', which needs 3 computed steps before "
                                             r"it; it has 2 \(steps \[0, 1\]\)"),
    (dict(step_kind=[0, 0, 5] + [0] * 5), r"step_kind: step 2 has code 5; expected 0\.\.3 for \['compute', 'reuse', "
                                          r"'taylor1', 'taylor2'\]"),
    (dict(step_kind=[0, -1] + [0] * 6), r"step_kind: step 1 has code -1"),
    (dict(step_kind=["compute", "skip"] + ["compute"] * 6), r"step_kind: step 1 is 'skip'; expected one of "
                                                            r"\['compute', 'reuse', 'taylor1', 'taylor2'\]"),
    (dict(step_kind=[0] * 7), r"step_kind: expected shape \[steps\] = \[8\] \(num_steps\), got \[7\]"),
    (dict(step_kind=np.zeros(8, np.float32)), r"step_kind: expected integer codes or names .*got dtype float32"),
    (dict(block_compute=np.ones((8, 56), bool)), r"block_compute: expected shape \[steps, layers\] = \[8, 57\] "
                                                 r"\(num_steps, num_layers\), got \[8, 56\]"),
    (dict(block_compute=np.full((8, 57), 2)), r"block_compute: expected bools .* or 0/1, got values \[2\]"),
    (dict(block_compute=np.ones((8, 57), np.float32)), r"block_compute: expected bools .*got dtype float32"),
    (dict(block_compute=~np.eye(8, 57, k=4, dtype=bool)), r"block_compute: step 0 must run every block .*got False "
                                                          r"at layer 4"),
    (dict(step_kind=KINDS, block_compute=np.where(np.arange(8)[:, None] == 2, np.arange(57) != 9, True)),
     r"block_compute: step 2 is 'reuse': the transformer does not run there, so its row means nothing and must be "
     r"all True; got False at layer 9"),
])
def test_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        head_plan().replace(**kw)


def test_taylor_history_counts_computed_steps_only():
    p = head_plan(steps=5).replace(step_kind=["compute", "compute", "reuse", "compute", "taylor2"])
    assert p.step_kind.tolist() == [0, 0, 1, 0, 3]                # steps 0, 1, 3 computed before step 4
    with pytest.raises(ValueError, match=r"step 3 is 'taylor2'.*it has 2 \(steps \[0, 1\]\)"):
        head_plan(steps=4).replace(step_kind=["compute", "compute", "reuse", "taylor2"])


# --- construction, properties, accounting -------------------------------------------------------------------------

def test_properties_and_work():
    p = step_plan()
    assert p.uses_step_methods and p.uses_block_caching
    assert p.step_kind.tolist() == [0, 0, 1, 0, 2, 0, 3, 1] and p.step_kind_names() == tuple(KINDS)
    assert p.computed_steps.tolist() == [0, 1, 3, 5]
    work = p.work_per_step_layer()
    assert work.shape == (8, 57) and work.dtype == np.float64
    assert (work[[2, 4, 6, 7]] == 0).all() and (work[[0, 1]] == 1).all()
    assert (work[[3, 5], :17] == 1).all() and (work[[3, 5], 17:] == 0).all()
    assert p.replace(block_compute=None).uses_block_caching is False
    only_blocks = head_plan().replace(block_compute=cached_blocks())
    assert only_blocks.uses_block_caching and not only_blocks.uses_step_methods


def test_flops_kept_count_what_runs():
    p, plain = step_plan(), head_plan()
    np.testing.assert_array_equal(p.flops_kept_per_step_layer(), plain.flops_kept_per_step_layer())  # head-wise
    ran = plain.flops_kept_per_step_layer() * p.work_per_step_layer()
    np.testing.assert_allclose(p.flops_kept_per_step(), ran.mean(axis=1))
    assert (p.flops_kept_per_step()[[2, 4, 6, 7]] == 0).all() and p.flops_kept_per_step()[0] == 1.0
    assert p.flops_kept_fraction() == pytest.approx(ran.mean())
    assert p.flops_kept_fraction() < plain.flops_kept_fraction()
    np.testing.assert_array_equal(p.method_counts()["full"], plain.method_counts()["full"])  # heads unchanged


def test_full_and_from_config_take_step_methods():
    full = CompressionPlan.full(FLUX, height=512, width=512, text_len=64, num_steps=8, step_kind=KINDS,
                                block_compute=cached_blocks())
    assert (full.head_window == -1).all() and full.step_kind_names() == tuple(KINDS) and full.uses_block_caching
    made = CompressionPlan.from_config(FLUX, full.head_window, height=512, width=512, text_len=64,
                                       step_kind=full.step_kind, block_compute=full.block_compute)
    assert made == full
    with pytest.raises(ValueError, match=r"step_kind: expected shape \[steps\] = \[8\]"):
        CompressionPlan.full(FLUX, height=512, width=512, text_len=64, num_steps=8, step_kind=["compute"])


def test_summary_mentions_skipped_steps_and_cached_blocks():
    text = step_plan().summary()
    assert "steps: compute 4, reuse 2, taylor1 1, taylor2 1; the transformer is skipped at steps 2, 4, 6-7" in text
    assert "blocks: 80 of the 228 blocks of computed steps cached (35.1%), at steps 3, 5" in text
    assert "heads: full" in text


# --- files ---------------------------------------------------------------------------------------------------------

def test_round_trip_and_layout(tmp_path):
    p = step_plan()
    q = CompressionPlan.load(p.save(tmp_path / "p.json"))
    assert q == p and q.digest() == p.digest() != head_plan().digest()
    assert q != p.replace(step_kind=None) and q != p.replace(block_compute=None)
    text = p.to_json()
    raw = json.loads(text)
    assert list(raw["methods"]) == ["head", "step", "block"]
    assert list(raw["methods"]["step"]) == ["kinds", "legend", "step_kind"]
    assert raw["methods"]["step"]["kinds"] == list(STEP_KINDS) and raw["methods"]["step"]["step_kind"] == KINDS
    assert list(raw["methods"]["block"]) == ["legend", "block_compute"]
    assert raw["methods"]["block"]["block_compute"] == cached_blocks().astype(int).tolist()
    assert '"step_kind": ["compute","compute","reuse","compute","taylor1",' in text  # one line
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("[1,1,")]
    assert len(rows) >= 8                                 # one line per step of block_compute
    for kind in ("step", "block"):                        # derived keys may be left out
        del raw["methods"][kind]["legend"]
    del raw["methods"]["step"]["kinds"]
    assert CompressionPlan.from_dict(raw) == p
    blocks_only = head_plan().replace(block_compute=cached_blocks())
    assert list(json.loads(blocks_only.to_json())["methods"]) == ["head", "block"]
    assert CompressionPlan.from_dict(json.loads(blocks_only.to_json())) == blocks_only


def _step(r):
    return r["methods"]["step"]


def _block(r):
    return r["methods"]["block"]


def _mlp(r):
    return r["methods"]["mlp"]


@pytest.mark.parametrize("edit, match", [
    (lambda r: _step(r)["step_kind"].__setitem__(2, "foca"),
     r"methods\.step\.step_kind: step 2 is 'foca'; expected one of \['compute', 'reuse', 'taylor1', 'taylor2'\]"),
    (lambda r: _step(r)["step_kind"].__setitem__(2, 1),
     r"methods\.step\.step_kind: expected a list of step method names"),
    (lambda r: _step(r).update(step_kind="reuse"), r"methods\.step\.step_kind: expected a list of step method names"),
    (lambda r: _step(r)["kinds"].append("foca"), r"methods\.step\.kinds: \['foca'\] not known to this ditfa-jax"),
    (lambda r: _step(r).update(kinds="compute"), r"methods\.step\.kinds: expected a list of step method names"),
    (lambda r: _step(r)["step_kind"].pop(), r"methods\.step\.step_kind: expected shape \[steps\] = \[8\] "
                                            r"\(num_steps\), got \[7\]"),
    (lambda r: _step(r)["step_kind"].__setitem__(0, "reuse"), r"methods\.step\.step_kind: step 0 must be 'compute'"),
    (lambda r: _step(r)["step_kind"].__setitem__(3, "taylor2"),
     r"methods\.step\.step_kind: step 3 is 'taylor2', which needs 3 computed steps before it; it has 2"),
    (lambda r: _step(r).pop("step_kind"), r"missing methods\.step\.step_kind"),
    (lambda r: _step(r).update(extra=1), r"unknown key\(s\) \['methods\.step\.extra'\]"),
    (lambda r: _block(r)["block_compute"].pop(), r"methods\.block\.block_compute: expected shape \[steps, layers\] "
                                                 r"= \[8, 57\] \(num_steps, num_layers\), got \[7, 57\]"),
    (lambda r: _block(r)["block_compute"][3].pop(), r"methods\.block\.block_compute: expected lists of 0/1 "
                                                    r"\[steps\]\[layers\], got ragged"),
    (lambda r: _block(r)["block_compute"][3].__setitem__(0, 2), r"methods\.block\.block_compute: expected lists of "
                                                                r"0/1"),
    (lambda r: _block(r)["block_compute"][0].__setitem__(6, 0), r"methods\.block\.block_compute: step 0 must run "
                                                                r"every block .*layer 6"),
    (lambda r: _block(r)["block_compute"][7].__setitem__(30, 0), r"methods\.block\.block_compute: step 7 is "
                                                                 r"'reuse': .*must be all True; got False at layer 30"),
    (lambda r: _block(r).pop("block_compute"), r"missing methods\.block\.block_compute"),
    (lambda r: r["run"].update(num_steps=9), r"methods\.head\.head_window: expected shape"),
    (lambda r: _mlp(r)["mlp_compute"].pop(), r"methods\.mlp\.mlp_compute: expected shape \[steps, layers\] = "
                                             r"\[8, 57\] \(num_steps, num_layers\), got \[7, 57\]"),
    (lambda r: _mlp(r)["mlp_compute"][3].pop(), r"methods\.mlp\.mlp_compute: expected lists of 0/1"),
    (lambda r: _mlp(r)["mlp_compute"][3].__setitem__(0, 2), r"methods\.mlp\.mlp_compute: expected lists of 0/1"),
    (lambda r: _mlp(r)["mlp_compute"][0].__setitem__(6, 0), r"methods\.mlp\.mlp_compute: step 0 must run every "
                                                            r"block's MLP branch .*layer 6"),
    (lambda r: _mlp(r)["mlp_compute"][2].__setitem__(4, 0), r"methods\.mlp\.mlp_compute: step 2 is 'reuse': .*must "
                                                            r"be all True; got False at layer 4"),
    (lambda r: _mlp(r)["mlp_compute"][3].__setitem__(30, 0), r"methods\.mlp\.mlp_compute: step 3, layer 30: the "
                                                             r"block is cached \(block_compute 0\)"),
    (lambda r: _mlp(r).pop("mlp_compute"), r"missing methods\.mlp\.mlp_compute"),
    (lambda r: _mlp(r).update(extra=1), r"unknown key\(s\) \['methods\.mlp\.extra'\]"),
])
def test_bad_step_files(tmp_path, edit, match):
    raw = json.loads(mlp_plan().to_json())  # steps, blocks and MLP branches
    edit(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match) as e:
        CompressionPlan.load(path)
    assert str(path) in str(e.value)


# --- cached MLP branches -------------------------------------------------------------------------------------------

def cached_mlps(steps=8, layers=57):
    """bool [steps, layers]: every other block's MLP branch cached on computed steps 1 and 3 (where step_plan runs
    the block)."""
    mc = np.ones((steps, layers), bool)
    mc[[1, 3], 0:17:2] = False
    return mc


def mlp_plan():
    return step_plan().replace(mlp_compute=cached_mlps())


def test_mlp_compute_default_work_summary_and_round_trip(tmp_path):
    p = head_plan()
    assert p.mlp_compute.dtype == bool and p.mlp_compute.shape == (8, 57) and p.mlp_compute.all()
    assert not p.mlp_compute.flags.writeable and not p.uses_mlp_caching
    assert p.replace(mlp_compute=np.ones((8, 57), bool)).digest() == p.digest()  # the default changes nothing
    assert "MLP branches" not in p.summary() and "mlp" not in json.loads(p.to_json())["methods"]
    m = mlp_plan()
    assert m.uses_mlp_caching and m.digest() != step_plan().digest()
    np.testing.assert_array_equal(m.work_per_step_layer(), step_plan().work_per_step_layer())  # blocks still run
    cached = m.cached_mlps()
    assert cached.dtype == bool and cached.sum() == 18 and cached[[1, 3], 0:17:2].all()
    assert not cached[[2, 4, 6, 7]].any() and not head_plan().cached_mlps().any()
    assert "MLP branches: 18 of the 148 that run their block reuse their cached output (12.2%), at steps 1, 3" \
        in m.summary()
    q = CompressionPlan.load(m.save(tmp_path / "m.json"))
    assert q == m and q.digest() == m.digest() and q != m.replace(mlp_compute=None)
    raw = json.loads(m.to_json())
    assert list(raw["methods"]) == ["head", "step", "block", "mlp"]
    assert raw["methods"]["mlp"]["mlp_compute"] == cached_mlps().astype(int).tolist()
    del raw["methods"]["mlp"]["legend"]
    assert CompressionPlan.from_dict(raw) == m
