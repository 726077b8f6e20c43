"""The results store never counts a corrupt point as done, never drops one silently, and
refuses a second writer."""

import json
import subprocess
import sys

import pytest

from steamviz.run.sweep import Store, StoreBusy


def _filled(tmp_path, n=3):
    s = Store(tmp_path, writer=True)
    for i in range(n):
        s.put(f"k{i}", dict(case_id=i, efficacy=1.0))
    return s


def test_a_truncated_point_is_not_done_and_is_moved_aside(tmp_path):
    s = _filled(tmp_path)
    s.close()
    p = tmp_path / "points" / "k1.json"
    p.write_text(p.read_text()[:10])  # truncated
    (tmp_path / "points" / "k2.json").write_text(json.dumps(dict(key="other", x=1)))
    s = Store(tmp_path, writer=True)
    assert s.has("k0") and not s.has("k1") and not s.has("k2")
    with pytest.warns(UserWarning, match="2 point file\\(s\\) .* cannot be read"):
        assert [r["key"] for r in s.rows()] == ["k0"]
    moved = s.quarantine()
    assert sorted(m.name.split(".")[0] for m in moved) == ["k1", "k2"]
    assert all(m.parent.name == "points-corrupt" for m in moved)
    assert [r["key"] for r in s.rows()] == ["k0"]  # nothing left to warn about
    s.close()


def test_a_second_writer_is_refused_and_temp_files_survive(tmp_path):
    s = _filled(tmp_path)
    tmp = tmp_path / "points" / ".k9.json.inflight"
    tmp.write_text("{")  # the first writer's atomic write in flight
    with pytest.raises(StoreBusy, match="in use by pid .*another folder"):
        Store(tmp_path, writer=True)
    code = ("import sys; from steamviz.run.sweep import Store, StoreBusy\n"
            "try:\n    Store(sys.argv[1], writer=True)\nexcept StoreBusy as e:\n"
            "    print(e); sys.exit(3)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 3 and "in use" in out.stdout
    assert tmp.exists()  # the refused process did not clean the holder's temp file
    assert [r["key"] for r in Store(tmp_path).rows()] == ["k0", "k1", "k2"]  # readers are free
    s.close()
    Store(tmp_path, writer=True).close()  # free again once the first writer is done
    assert not tmp.exists()


def test_a_changed_config_is_refused_before_any_work(tmp_path):
    from steamviz.run.sweep import ConfigError, SweepConfig, _config_change, run_sweep

    cfg = SweepConfig.from_dict(dict(n_edits=2, generation=False))
    s = _filled(tmp_path)
    s.close()
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert _config_change(tmp_path, cfg) == []
    other = SweepConfig.from_dict(dict(n_edits=3, lams=[5.0], generation=False))
    assert _config_change(tmp_path, other) == ["lams", "n_edits"]
    with pytest.raises(ConfigError, match="changed: lams, n_edits.*--force"):
        run_sweep(other, tmp_path, lm=object())  # refused before the model is touched
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["n_edits"] == 2


def test_a_run_recorded_before_a_config_key_existed_resumes(tmp_path):
    # a run folder written before a key was added (here: widen_to) records no value for it;
    # it ran with that key's default, so the same config resumes and only another value of
    # the new key counts as a change
    import yaml

    from steamviz.run.sweep import SweepConfig, _config_change

    cfg = SweepConfig.from_dict(dict(n_edits=2, generation=False))
    _filled(tmp_path).close()
    old = cfg.to_dict()
    del old["widen_to"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert _config_change(tmp_path, cfg) == []
    other = SweepConfig.from_dict(dict(n_edits=2, generation=False, widen_to=0))
    assert _config_change(tmp_path, other) == ["widen_to"]


def test_a_moved_run_folder_resumes_and_a_changed_input_file_is_refused(tmp_path):
    """The config names files (a claims run's requests file lives in its run folder): after
    the folder moves, the same bytes under another path are the same input; other bytes
    under any path are a change."""
    import shutil

    import yaml

    from steamviz.data.datasets import load_named
    from steamviz.run.sweep import SweepConfig, _config_change, _write_inputs

    a, b = tmp_path / "a", tmp_path / "b"
    _filled(a).close()
    reqs = a / "requests.jsonl"
    reqs.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in load_named("default", 2)))
    cfg = SweepConfig.from_dict(dict(data=str(reqs), n_edits=2, generation=False))
    (a / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _write_inputs(a, cfg)
    assert set(json.loads((a / "inputs.json").read_text())) == {"data"}
    shutil.copytree(a, b)
    shutil.rmtree(a)  # another machine: the recorded path is gone
    moved = SweepConfig.from_dict(dict(data=str(b / "requests.jsonl"), n_edits=2,
                                       generation=False))
    assert _config_change(b, moved) == []
    (b / "requests.jsonl").write_text(reqs.name)  # other bytes
    assert _config_change(b, moved) == ["data"]
    (b / "inputs.json").unlink()  # a folder written before inputs.json: the path decides
    assert _config_change(b, moved) == ["data"]
