"""Caption tokenization, captions/s: fastclip's tokenizer against open_clip's, on unseen and repeated words.

The ids are open_clip's exactly (checked here on a sample, and in tests/test_tokenizer.py on awkward text). The
unseen-words case is dominated by the BPE merges, which both do alike; the repeated-words case is what a large
corpus looks like once its common words have been seen.
"""

from __future__ import annotations

import random
import statistics
import string

import pytest

from harness import Result, bench_once, time_fn

COUNTS = {"full": 20_000, "quick": 500}


def _captions(n: int, *, unseen: bool) -> list[str]:
    rng = random.Random(0)
    words = ["red", "circle", "photo", "large", "on", "the", "left", "of", "a", "picture", "small", "blue"]
    out = []
    for _ in range(n):
        if unseen:  # fresh letter strings defeat the BPE cache, as web captions mostly do
            toks = [
                "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(rng.randint(5, 15))
            ]
        else:
            toks = rng.choices(words, k=rng.randint(5, 15))
        out.append(" ".join(toks))
    return out


def _fresh_passes(make, captions: list[str], repeats: int) -> list[float]:
    """Seconds of ``repeats`` passes, each by a fresh tokenizer: a second pass of one tokenizer would measure its
    word cache, not the words."""
    times = []
    for _ in range(repeats):
        tok = make()
        times.append(time_fn(lambda tok=tok: tok(captions), repeats=1, warmup=0).median_s)
    return times


@pytest.mark.parametrize("unseen", [True, False], ids=["unseen", "repeated"])
def test_tokenizer_cpu(benchmark, record, quick, unseen):
    import open_clip

    from fastclip.data.tokenizer import build_tokenizer

    n = COUNTS["quick" if quick else "full"]
    repeats = 1 if quick else 5
    captions = _captions(n, unseen=unseen)
    if benchmark.disabled:
        passes = bench_once(benchmark, lambda: _fresh_passes(lambda: build_tokenizer("ViT-B-32"), captions, repeats))
        ours = statistics.median(passes)
    else:  # the same passes, under pytest-benchmark: each round's tokenizer made fresh by the setup
        benchmark.pedantic(
            lambda tok: tok(captions), setup=lambda: ((build_tokenizer("ViT-B-32"),), {}), rounds=repeats
        )
        ours = benchmark.stats.stats.median
    theirs = statistics.median(_fresh_passes(lambda: open_clip.get_tokenizer("ViT-B-32"), captions, repeats))
    assert (build_tokenizer("ViT-B-32")(captions) == open_clip.get_tokenizer("ViT-B-32")(captions)).all()
    params = {"captions": n, "words": "unseen" if unseen else "repeated", "context": 77, "device": "cpu"}
    record(Result("tokenizer", "captions/s", params, "captions_per_second", n / ours, n / theirs,
                  extra={"runs": repeats}, note="same ids as open_clip's SimpleTokenizer"))  # fmt: skip
