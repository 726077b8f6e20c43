"""One vocabulary (#19): ``block`` is a decoder-block index, ``layer`` a residual-stream index.

Names written before the rename -- ROME's ``layer``, MEMIT's / BaFT's / KNE's ``layers``,
KNE's ``layer_span``, a sweep's ``edit_layers`` -- are still read from mappings (YAML files,
stored configs, stored rows), a keyword argument by an old name is an error naming the new
one, and a point's store key is the key it had before, so old run folders resume.
"""

import dataclasses

import pytest

from steamviz.edit import editors
from steamviz.edit.baft import BaFTHparams
from steamviz.edit.kne import KNEHparams
from steamviz.edit.memit import MEMITHparams
from steamviz.edit.rome_hparams import ROMEHparams
from steamviz.run.plan import SweepConfig, grid, point_key

REQ = dict(prompt="{} is located in", subject="Toronto", target_new="Japan", target_true="Canada")


def test_every_editor_parameter_follows_the_vocabulary():
    """Fields that name blocks say ``block``; fields that name stream layers say ``layer``
    and are checked as stream layers; no grid axis is called ``layer``."""
    assert "layer" not in editors.AXES and "block" in editors.AXES
    for name in editors.methods():
        cls = editors.spec(name).params
        for f in dataclasses.fields(cls) if cls else []:
            if "block" in f.name:
                assert f.name in editors.BLOCK_FIELDS + ("block_span",), (name, f.name)
            if "layer" in f.name:
                assert f.name in editors.LAYER_FIELDS, (name, f.name)
        assert "layer" not in editors.spec(name).extra, name


def test_old_names_are_read_from_mappings_and_named_in_errors(tmp_path):
    assert ROMEHparams.from_dict({"layer": 3}).block == 3  # steamviz's own YAML, before
    assert ROMEHparams.from_dict({"layers": [4]}).block == 4  # EasyEdit's
    y = tmp_path / "rome.yaml"
    y.write_text("layer: 6\nv_lr: 0.1\n")
    assert ROMEHparams.from_yaml(y).block == 6
    assert MEMITHparams.from_dict({"layers": [2, 3]}).blocks == (2, 3)
    assert BaFTHparams.from_dict({"layers": [4]}).blocks == (4,)
    k = KNEHparams.from_dict({"layers": [1, 2], "layer_span": 0.5})
    assert k.blocks == (1, 2) and k.block_span == 0.5
    # a keyword argument by the old name: the error names the new one and the vocabulary
    with pytest.raises(TypeError, match="'layer': it is 'block' now .*decoder-block indices"):
        ROMEHparams().replace(layer=3)
    with pytest.raises(TypeError, match="'layers': it is 'blocks' now"):
        MEMITHparams().replace(layers=(1, 2))
    why = editors.check_params("kne", {"layer_span": 1.0})
    assert "'layer_span': it is 'block_span' now" in why
    # both names in one mapping: refused, not silently merged
    with pytest.raises(ValueError, match="'layer' and 'block' name the same ROME"):
        ROMEHparams.from_dict({"layer": 3, "block": 4})
    with pytest.raises(ValueError, match="'layers' and 'blocks' name the same MEMIT"):
        MEMITHparams.from_dict({"layers": [3], "blocks": [4]})
    with pytest.raises(TypeError, match="'layers': it is 'blocks' now"):
        KNEHparams.from_dict({"layers": [3], "blocks": [4]})


def test_a_sweep_config_written_before_the_rename_reads_as_today():
    old = dict(n_edits=2, methods=["rome", "memit", "kne"], edit_layers=[4, 6],
               hparams=dict(layer=5, v_num_grad_steps=3),
               method_params={"memit": {"layers": [3, 4]}, "kne": {"layer_span": 0.5}})
    cfg = SweepConfig.from_dict(old)
    assert cfg.edit_blocks == [4, 6] and cfg.hparams == dict(block=5, v_num_grad_steps=3)
    assert cfg.method_params == {"memit": {"blocks": [3, 4]}, "kne": {"block_span": 0.5}}
    assert {p["block"] for p in grid(cfg, default_block=5) if p["method"] == "rome"} == {4, 6}
    with pytest.raises(ValueError, match="'edit_layers' is 'edit_blocks' now, which is given"):
        SweepConfig.from_dict(dict(edit_layers=[4], edit_blocks=[5]))  # both: ambiguous


def test_point_keys_are_the_keys_of_before_the_rename():
    """Computed by the code before the rename (91b7dfd) for the same points, written with
    ``layer``: a run folder of then resumes without recomputing a point."""
    pt = dict(method="steam-rome", block=5, lam=20.0, align_layers="default", centered=False,
              anchor_seed=1)
    key = point_key("fp", REQ, pt, ROMEHparams().to_dict(), 0,
                    dict(gen=True, method_params={"memit": {"blocks": [3, 4]}}))
    assert key == "d36b4e291c1f2ce72ad84dc9"
    pt = dict(method="unedited", block=None, lam=None, align_layers=None, centered=None)
    assert point_key("fp", REQ, pt, ROMEHparams().replace(block=7).to_dict(), 0,
                     dict(gen=False)) == "208a766f5fd7a984683b6cf1"


def test_an_old_run_folder_resumes_and_reads_with_todays_names(tmp_path):
    import yaml

    from steamviz.run.store import Store
    from steamviz.run.sweep import _config_change

    run = tmp_path / "run"
    old = SweepConfig().to_dict()
    old["edit_layers"] = old.pop("edit_blocks")
    old["hparams"] = {"layer": 5}
    (run / "points").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    store = Store(run, writer=True)
    try:
        store.put("k0", dict(case_id="a", method="rome", layer=5, lam=None, efficacy=1.0))
        store.put("k1", dict(case_id="a", method="rome", block=6, lam=None, efficacy=1.0))
    finally:
        store.close()
    assert _config_change(run, SweepConfig.from_dict(dict(hparams={"block": 5}))) == []
    assert _config_change(run, SweepConfig.from_dict(dict(hparams={"block": 6}))) == ["hparams"]
    df = Store(run).frame()
    assert "layer" not in df.columns and sorted(df.block) == [5, 6]
