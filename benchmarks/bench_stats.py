"""Key second-moment statistics: ``stats.second_moment`` against plain loops, in one run.

Corpus: WikiText-2 raw test and WikiText-103 valid (the ``wikitext`` data set; its clean
text, not the CSV-quoted twin of the same articles), the first ``--tokens`` tokens (default
100,000, ``mom2_n_tokens``'s default) in chunks of up to 128 tokens, batches of 16; default
model, ROME's default block (5 on SmolLM2). Every side gets the same chunks, batched by
length, and sums ``k^T k`` the same way (:func:`steamviz.look.stats.accumulate`); they differ
only in what runs per batch:

- steamviz: ``second_moment`` (the projection's input through :func:`steamviz.core.hooks.read`,
  which ends the pass after the edited block), its disk cache pointed at a fresh folder.
- plain: the baseline #20 names, "a plain loop written like EasyEdit's layer_stats: a full
  forward per batch, with a hook on the layer": ``model(**batch)`` (every block and the
  logits at every position), a forward hook keeping the projection's input.
- stop: the same loop ended by the hook after the edited block, as the ROME/EasyEdit
  ``layer_stats`` code itself does (``nethook.Trace(..., stop=True)``): printed beside, so
  the headline's baseline is not mistaken for EasyEdit's own loop.

The three C must agree (max relative difference printed). Last line: steamviz seconds /
plain seconds (#20's goal: at most 0.2).
Run: python benchmarks/bench_stats.py [--tokens N] (needs the wikitext data set: `steamviz
data get wikitext`, or the mirror).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from steamviz.core.arch import mlp_out_module
from steamviz.core.models import load_model
from steamviz.data import fetch
from steamviz.edit.rome_hparams import ROMEHparams
from steamviz.look import stats

FILES = ("text_corpus/wikitext-2-raw/wiki.test.raw",
         "text_corpus/wikitext-103-tokens/wiki.valid.clean.txt")


class Stop(Exception):
    pass


@torch.no_grad()
def plain(lm, chunks, block, batch_size, stop):
    """The baseline loop: a forward hook on the projection keeps its input; ``stop`` ends the
    pass there, else the whole model runs (``model(**batch)``: logits at every position)."""
    got = {}

    def hook(m, args, out):
        got["k"] = args[0].detach()
        if stop:
            raise Stop

    def keys(b):
        try:
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        except Stop:
            pass
        return got["k"]

    h = mlp_out_module(lm.model, block).register_forward_hook(hook)
    try:
        acc, count = stats.accumulate(chunks, batch_size, lm.tok.pad_token_id, lm.device, keys)
    finally:
        h.remove()
    return acc / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(device="cpu")
    block = ROMEHparams.for_model(lm).block
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for f in FILES:
            (corpus / Path(f).name).symlink_to(fetch.path("wikitext", f))
        files = stats.corpus_files(corpus)
        chunks = stats.text_chunks(lm, files, args.tokens, 128)
        n = sum(len(c) for c in chunks)
        print(f"{lm.name}, block {block}: {n:,} tokens in {len(chunks)} chunks "
              f"({', '.join(f.name for f in files)})", flush=True)
        plain(lm, chunks[:16], block, 16, stop=False)  # warm-up: the allocator, the kernels
        os.environ["STEAMVIZ_CACHE"] = str(Path(tmp) / "cache")  # no cached statistics
        t = time.perf_counter()
        C = stats.second_moment(lm, block, corpus=corpus, n_tokens=args.tokens, progress=False)
        ours = time.perf_counter() - t
        print(f"steamviz second_moment: {ours:.1f} s", flush=True)
        # each baseline also reads and tokenizes the corpus in its timed part, as
        # second_moment does
        t = time.perf_counter()
        C_stop = plain(lm, stats.text_chunks(lm, files, args.tokens, 128), block, 16, stop=True)
        t_stop = time.perf_counter() - t
        print(f"plain loop, stopped after the block (as layer_stats' Trace(stop=True)): "
              f"{t_stop:.1f} s", flush=True)
        t = time.perf_counter()
        C_full = plain(lm, stats.text_chunks(lm, files, args.tokens, 128), block, 16, stop=False)
        t_full = time.perf_counter() - t
        print(f"plain loop, full forward per batch: {t_full:.1f} s", flush=True)
    for name, other in (("stop", C_stop), ("full", C_full)):
        rel = float((C - other).abs().max() / C.abs().max())
        print(f"C vs {name}: max relative difference {rel:.2e}")
    print(f"steamviz / stopped loop: {ours / t_stop:.3f}; steamviz / full forward: "
          f"{ours / t_full:.3f}")
    print(f"{ours / t_full:.3f}")


if __name__ == "__main__":
    main()
