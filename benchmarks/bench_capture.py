"""Capture cost: all layers x two positions for 64 prompts vs a plain forward pass.

Run: python benchmarks/bench_capture.py   (last line: the time ratio capture / forward;
target <= 1.10). Both are timed in the same run, interleaved, median of 7 repeats.
"""

import statistics
import time

import torch

from steamviz.look.capture import capture
from steamviz.core.models import load_model
from steamviz.core.tokens import encode

CITIES = ["Paris", "Tokyo", "Rome", "Berlin", "Madrid", "Cairo", "Toronto", "Sydney"]
TEMPLATES = ["{} is located in the country of", "The most famous landmark in {} is the",
             "People who live in {} usually speak", "The mayor of {} announced that the",
             "In {}, the weather in winter is", "{} is a city known for its",
             "The main airport of {} is called", "Tourists who visit {} often see the"]


def main():
    torch.manual_seed(0)
    lm = load_model(device="cpu")
    prompts = [t.format(c) for t in TEMPLATES for c in CITIES]
    subjects = [c for _ in TEMPLATES for c in CITIES]
    assert len(prompts) == 64
    batch = encode(lm, prompts)

    def plain():
        with torch.no_grad():
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False)

    def cap():
        capture(lm, prompts, positions=("last", "subject_last"), subjects=subjects,
                batch_size=64)

    plain(), cap()  # warm-up
    tp, tc = [], []
    for _ in range(7):
        for fn, acc in ((plain, tp), (cap, tc)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    p, c = statistics.median(tp), statistics.median(tc)
    print(f"plain forward (64 prompts, with logits): {p * 1000:.1f} ms")
    print(f"capture all {lm.n_blocks + 1} layers x 2 positions: {c * 1000:.1f} ms")
    print("ratio capture / forward:")
    print(f"{c / p:.3f}")


if __name__ == "__main__":
    main()
