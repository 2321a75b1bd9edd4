"""Caption tokenizer: open_clip's own, token for token, with its per-caption overhead cut.

The loader's thread tokenizes while the training loop launches kernels, and both need the GIL, so every
microsecond here is one the step may wait for. For the CLIP BPE tokenizer (``SimpleTokenizer`` with its
'lower' clean, what every OpenAI-style CLIP model uses) :class:`FastTokenizer` gives the same ids faster:

- cleaning: ``ftfy.fix_text`` and ``html.unescape`` leave printable ASCII without an ``&`` as it is, so such a
  caption (most web captions) only has its whitespace collapsed and is lower-cased, as open_clip then does;
- encoding: printable ASCII words are their own byte-level form (CLIP maps bytes 33-126 to themselves), a new
  word's merges run in C++ (csrc/bpe.cpp; open_clip's Python loop where the extension is not built), and each
  word's ids are cached (bounded), so a known word costs one dict lookup;
- batching: rows are written into one int64 array instead of one small tensor per caption.

Anything else (other tokenizers, other clean modes, reduction masks) is open_clip's tokenizer unchanged.
tests/test_tokenizer.py compares the ids with open_clip's on ASCII, Unicode, HTML, control characters and
captions past the context length.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fastclip.console import log
from fastclip.model import resolve_model_name


class FastTokenizer:
    CACHE_WORDS = 1 << 20  # cached words before the cache starts over (open_clip's own BPE cache is unbounded)

    def __init__(self, inner, *, compiled: bool = True):
        self.inner = inner
        self.context_length = inner.context_length
        self.sot, self.eot = inner.sot_token_id, inner.eot_token_id
        self._ids: dict[str, list[int]] = {}
        self._special = {inner.decoder[i] for i in inner.all_special_ids}  # kept whole, never merged
        self._bpe = _compiled_bpe(inner) if compiled else None

    def __getstate__(self) -> dict:  # loader workers started by spawn get a copy: the C++ object is rebuilt there
        return {**self.__dict__, "_bpe": self._bpe is not None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bpe = _compiled_bpe(self.inner) if state["_bpe"] else None

    def _clean(self, text: str) -> str:
        if text.isascii() and text.isprintable() and "&" not in text:
            return " ".join(text.split()).lower()
        return self.inner.clean_fn(text)

    def _word_ids(self, word: str) -> list[int]:
        inner = self.inner
        symbols = word
        if not (word.isascii() and word.isprintable()):  # CLIP's byte-level form of the word's UTF-8
            symbols = "".join(inner.byte_encoder[b] for b in word.encode())
        if self._bpe is not None and symbols not in self._special:
            ids = self._bpe.encode(symbols)
        else:
            ids = [inner.encoder[piece] for piece in inner.bpe(symbols).split(" ")]
        if len(self._ids) >= self.CACHE_WORDS:
            self._ids.clear()
        self._ids[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._ids
        for word in self.inner.pat.findall(self._clean(text)):
            cached = cache.get(word)
            ids.extend(cached if cached is not None else self._word_ids(word))
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > length:  # truncated as open_clip does: the last kept id becomes end-of-text
                ids = ids[:length]
                ids[-1] = self.eot
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)


_fallback_said = False


def _compiled_bpe(inner):
    """csrc/bpe.cpp's merge loop over ``inner``'s vocabulary and merges, or None without the C++ extension."""
    try:
        from fastclip import _C
    except ImportError as e:
        global _fallback_said
        if not _fallback_said:  # a silent fallback would hide a build problem behind a slower data path
            _fallback_said = True
            log.warning("tokenizer: new words' BPE merges run in Python (%s); `make setup` builds fastclip._C", e)
        return None
    vocab = [inner.decoder[i] for i in range(len(inner.decoder))]
    merges = [pair for pair, _ in sorted(inner.bpe_ranks.items(), key=lambda item: item[1])]
    return _C.Bpe(vocab, merges)


def build_tokenizer(model_name: str) -> Callable[[list[str]], torch.Tensor]:
    """``texts -> LongTensor[len(texts), context_length]`` for the architecture ``model_name`` (name or JSON):
    open_clip's ids, from :class:`FastTokenizer` where it applies."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower

    tokenizer = open_clip.get_tokenizer(resolve_model_name(model_name))
    if (
        type(tokenizer) is SimpleTokenizer
        and tokenizer.clean_fn is _clean_lower
        and tokenizer.reduction_fn is None
        and all(tokenizer.byte_encoder[b] == chr(b) for b in range(33, 127))
    ):
        return FastTokenizer(tokenizer)
    return tokenizer
