"""fastclip's tokenizer gives open_clip's ids exactly, whatever the captions hold."""

import random
import string

import open_clip
import pytest
import torch

from fastclip.data.tokenizer import FastTokenizer, build_tokenizer

AWKWARD = [
    "",
    "   ",
    "A Photo of a RED circle.",
    "tabs\tand\nnew lines\r\nand  double  spaces ",
    "Tom &amp; Jerry &lt;3 &amp;amp; &#39;quoted&#39;",
    "fish & chips",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c3\u00a9 (mojibake)",
    "\u201ccurly quotes\u201d and \u2018single\u2019 \u2014 dashes\u2026",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 and \ufb01 ligature",
    "\u4e00\u53ea\u732b\u5750\u5728\u684c\u5b50\u4e0a \u732b",
    "emoji \U0001f431\U0001f436 \u2764\ufe0f",
    "control \x07 bell \x1b[31mred\x1b[0m escape \x00 nul \x7f del",
    "numbers 1234567890 and 3.14159, 1e-9",
    "'s 't 're 've 'm 'll 'd it's don't we're",
    "<start_of_text> literal <end_of_text> specials",
    "word " * 100,  # past the context length: truncated, the last id becomes end-of-text
    "x" * 500,
]


def _random_captions(n: int, alphabet: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(0, 120))) for _ in range(n)]


@pytest.mark.parametrize(
    "captions",
    [
        AWKWARD,
        _random_captions(2000, string.printable, 0),
        _random_captions(1000, string.ascii_letters + " " * 8 + "&;#.,'!?-", 1),
        _random_captions(1000, "abc \u00e9\u00fc\u4e00\u201c\u201d&;\t\U0001f431\u0301\u00a0\u2028", 2),
    ],
    ids=["awkward", "printable-ascii", "entities", "unicode"],
)
@pytest.mark.parametrize("compiled", [True, False], ids=["cpp-bpe", "python-bpe"])
def test_ids_equal_open_clip(captions, compiled):
    theirs = open_clip.get_tokenizer("ViT-B-32")
    ours = FastTokenizer(open_clip.get_tokenizer("ViT-B-32"), compiled=compiled)
    assert (ours._bpe is not None) == compiled  # the C++ extension is built in every test environment
    for _ in range(2):  # the second pass runs on the word cache
        got, want = ours(captions), theirs(captions)
        assert got.dtype == want.dtype == torch.long and got.shape == want.shape
        mismatched = [c for c, g, w in zip(captions, got, want) if not torch.equal(g, w)]
        assert not mismatched, mismatched[:3]
    assert torch.equal(ours("one caption"), theirs("one caption"))
    assert torch.equal(ours(captions[:5], context_length=16), theirs(captions[:5], context_length=16))


@pytest.mark.parametrize("kwargs", [{"clean": "canonicalize"}, {"clean": "whitespace"}, {"reduction_mask": "random"}])
def test_other_tokenizers_are_open_clips_own(monkeypatch, kwargs):
    from open_clip.tokenizer import SimpleTokenizer

    other = SimpleTokenizer(**kwargs)
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name, **_: other)
    assert build_tokenizer("ViT-B-32") is other  # no fast path: open_clip's tokenizer as it is


def test_demo_model_keeps_its_context_length():
    tok = build_tokenizer("fastclip-tiny")
    assert isinstance(tok, FastTokenizer) and tok("a red circle").shape == (1, 32)
    assert tok._bpe is not None


def test_word_cache_is_bounded(monkeypatch):
    tok = build_tokenizer("ViT-B-32")
    monkeypatch.setattr(FastTokenizer, "CACHE_WORDS", 10)
    captions = _random_captions(50, string.ascii_lowercase + " ", 3)
    assert torch.equal(tok(captions), open_clip.get_tokenizer("ViT-B-32")(captions))
    assert len(tok._ids) <= 10


def test_pickled_copy_gives_the_same_ids():
    import pickle

    tok = build_tokenizer("ViT-B-32")
    copy = pickle.loads(pickle.dumps(tok))  # what a DataLoader worker started by spawn receives
    assert copy._bpe is not None and copy._bpe is not tok._bpe
    assert torch.equal(copy(AWKWARD), open_clip.get_tokenizer("ViT-B-32")(AWKWARD))


def test_the_python_bpe_fallback_is_said_once(monkeypatch, capfd):
    import builtins

    from fastclip.data import tokenizer as module

    real_import = builtins.__import__

    def no_extension(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "fastclip" and fromlist and "_C" in fromlist:
            raise ImportError("fastclip._C is not built (simulated)")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_extension)
    monkeypatch.setattr(module, "_fallback_said", False)
    for _ in range(2):
        assert build_tokenizer("ViT-B-32")._bpe is None
    said = capfd.readouterr().err
    assert said.count("BPE merges run in Python (fastclip._C is not built (simulated))") == 1
