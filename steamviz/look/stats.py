"""Second-moment statistics ``C = E[k k^T]`` of the keys entering an MLP output projection.

ROME and MEMIT whiten their updates with ``C^-1``. Keys are read at the input of the edited
projection over a text corpus (a folder of ``.txt`` files, e.g. the ``wikitext`` data set)
or over text the model samples itself (``corpus="model"``, fixed seed). Results are cached
per (model fingerprint, block, corpus fingerprint, token count) in the cache dir.

>>> C = second_moment(lm, block=5, corpus=fetch.path("wikitext", "text_corpus"),
...                   n_tokens=100_000)                  # doctest: +SKIP
>>> C.shape                                              # doctest: +SKIP
torch.Size([1536, 1536])
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.arch import mlp_out_module
from ..core.hooks import Tap, read
from ..core.guard import require_unedited
from ..core.io import load_tensors, save_tensors
from ..core.paths import cache_dir
from ..core.tokens import pad


def corpus_files(corpus: str | os.PathLike) -> list[Path]:
    p = Path(corpus)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"corpus {str(p)!r} is neither a folder of .txt files nor a file")
    files = sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in (".txt", ".raw", ".tokens"))
    # the wikitext data set holds WikiText-103's validation split twice: as published
    # (CSV-quoted NAME.tokens) and decoded (NAME.clean.txt); read it once
    files = [x for x in files if not (x.suffix == ".tokens"
                                      and x.with_name(x.stem + ".clean.txt").is_file())]
    if not files:
        raise FileNotFoundError(f"corpus folder {str(p)!r} holds no .txt/.raw/.tokens files")
    return files


def corpus_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:12]


def text_chunks(lm, files: list[Path], n_tokens: int, seq_len: int) -> list[list[int]]:
    """Token chunks of the corpus ``files`` as :func:`second_moment` reads them: one per line
    longer than 80 characters, cut to ``seq_len`` with the model's start tokens first, until
    ``n_tokens`` tokens."""
    from ..data.corpus import read_text

    out, total = [], 0
    for f in files:
        text = read_text(f)
        paras = [t.strip() for t in text.split("\n") if len(t.strip()) > 80]
        for para in paras:
            ids = lm.tok(para, add_special_tokens=False)["input_ids"][: seq_len - len(lm.prefix_ids)]
            out.append(list(lm.prefix_ids) + ids)
            total += len(out[-1])
            if total >= n_tokens:
                return out
    return out


@torch.no_grad()
def _chunks_from_model(lm, n_tokens: int, seq_len: int, seed: int) -> list[list[int]]:
    from ..core.context import sample

    g = torch.Generator(device="cpu").manual_seed(seed)
    out, total = [], 0
    while total < n_tokens:
        seqs = sample(lm, n=16, length=seq_len - len(lm.prefix_ids), generator=g, top_k=50)
        out.extend(list(lm.prefix_ids) + s for s in seqs)
        total += sum(len(s) for s in seqs)
    return out


@torch.no_grad()
def second_moment(
    lm,
    block: int,
    corpus: str | os.PathLike | None = None,
    n_tokens: int = 100_000,
    seq_len: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """``E[k k^T]`` (float64 ``[d_in, d_in]``) of the edited projection's input in block ``block``.

    ``corpus``: folder/file of text, or ``"model"`` to sample text from the model itself.
    """
    if corpus is None:
        raise ValueError("second_moment needs a corpus (a folder of .txt files) or 'model'")
    if str(corpus) == "model":
        cfp = f"model-seed{seed}"
        files = None
    else:
        files = corpus_files(corpus)
        cfp = corpus_fingerprint(files)
    key = f"{lm.fingerprint}-L{block}-{cfp}-n{n_tokens}-s{seq_len}"
    path = cache_dir() / "stats" / f"mom2-{key}.safetensors"
    if path.exists():
        try:
            t, meta = load_tensors(path)
            C = t.get("C")
            if meta.get("key") != key or C is None or C.dim() != 2 or C.shape[0] != C.shape[1]:
                raise ValueError(f"{path}: not the statistics of {key}")
            return C
        except ValueError:
            path.unlink(missing_ok=True)  # corrupt or foreign: recompute
    require_unedited(lm.model, "second-moment statistics")
    chunks = (
        _chunks_from_model(lm, n_tokens, seq_len, seed)
        if files is None
        else text_chunks(lm, files, n_tokens, seq_len)
    )
    mod = mlp_out_module(lm.model, block)
    acc, count = accumulate(chunks, batch_size, lm.tok.pad_token_id, lm.device,
                            lambda b: read(lm, b.input_ids, b.attention_mask,
                                           {"k": Tap(mod, "input")})[0]["k"],
                            desc=f"mom2 block {block}" if progress else None)
    C = acc / max(count, 1)
    save_tensors(path, {"C": C}, dict(kind="mom2", key=key, tokens=count))
    return C


def accumulate(chunks: list[list[int]], batch_size: int, pad_id: int, device, keys,
               desc: str | None = None) -> tuple[torch.Tensor, int]:
    """``(sum of k k^T over every real token, token count)`` of ``keys(batch) -> [batch, T,
    d_in]``. Chunks are batched by length (little padding), each batch's ``k^T k`` is one
    float32 product on the model's device, and the batches are summed in float64 on the CPU.
    Reused by ``benchmarks/bench_stats.py`` so its baselines differ only in ``keys``."""
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
    acc, count = None, 0
    bar = tqdm(total=sum(len(c) for c in chunks), desc=desc, unit="tok", disable=desc is None)
    for s in range(0, len(order), batch_size):
        b = pad([chunks[i] for i in order[s : s + batch_size]], pad_id, device)
        keep = b.attention_mask.bool()
        k = keys(b)[keep].float()
        prod = (k.T @ k).double().cpu()
        acc = prod if acc is None else acc + prod
        count += k.shape[0]
        bar.update(int(keep.sum()))
    bar.close()
    if acc is None:
        raise ValueError("second-moment statistics of an empty corpus")
    return acc, count


def inverse(C: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``(C + ridge * mean(diag C) I)^-1`` in float64."""
    C = C.double()
    if ridge:
        C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    return torch.linalg.inv(C)
