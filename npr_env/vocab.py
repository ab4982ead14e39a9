"""TagVocab: a tokenizer seen token by token (which ids are tags, whitespace or end of sequence).

``TagVocab.of(tokenizer)`` caches one vocab per tokenizer *here*, never on the caller's tokenizer object. The
cache is keyed by ``id(tokenizer)``, so it works for any tokenizer (unhashable, with ``__slots__``, not
weak-referenceable). A vocab holds its tokenizer, so that id cannot be reused while the entry lives: entries are
weak (an entry lives as long as a graph, an engine or anyone else holds the vocab) plus a few strong ones for
the most recently used tokenizers, so a loop of ``npr_env.parse`` calls does not rebuild the vocab each time.
(A ``WeakKeyDictionary`` keyed by the tokenizer would never free anything: its value, the vocab, holds the key.)
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

from .schema import TAGS

_RECENT = 4  # strongly held vocabs (of the most recently used tokenizers)


class TagVocab:
    """A tokenizer seen token by token: which ids are tags, whitespace or end of sequence."""

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        missing = [t for t in TAGS if t not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer has no single token for {missing}; add them with "
                "npr_env.add_npr_tokens(tokenizer, model) or use npr_env.load_tokenizer()")
        self.tokenizer = tokenizer
        self.id_of = {t: vocab[t] for t in TAGS}
        self.tag_of = {i: t for t, i in self.id_of.items()}
        self.eos_ids = frozenset(i for i in [tokenizer.eos_token_id] if i is not None)
        self.unk_ids = frozenset(i for i in [getattr(tokenizer, "unk_token_id", None)] if i is not None)
        self._ws: dict[int, bool] = {}
        self._numbers: dict[str, tuple[int, ...]] = {}
        self.size = len(tokenizer)

    def step_number_ids(self, number: str) -> tuple[int, ...]:
        """The ids an engine forces after ``<step>`` in the branch of plan ``number``: the tokens of ``"N:"``."""
        ids = self._numbers.get(number)
        if ids is None:
            ids = self._numbers[number] = tuple(self.tokenizer.encode(f"{number}:", add_special_tokens=False))
        return ids

    def is_ws(self, tid: int) -> bool:
        ws = self._ws.get(tid)
        if ws is None:
            text = self.tokenizer.decode([tid]) if 0 <= tid < self.size else "x"
            ws = self._ws[tid] = text != "" and text.strip() == ""
        return ws

    def is_tag(self, tid: int) -> bool:
        return tid in self.tag_of

    def is_eos(self, tid: int) -> bool:
        return tid in self.eos_ids

    def decode(self, ids) -> str:
        ids = [i for i in ids if 0 <= i < self.size]
        return self.tokenizer.decode(ids)

    def has_unknown(self, ids) -> bool:
        """Whether ``ids`` hold a token that stands for a character the vocabulary cannot write (or no token)."""
        return any(i in self.unk_ids or not 0 <= i < self.size for i in ids)

    def measure_text(self, ids) -> str:
        """The text of ``ids`` for length checks: each unknown token (``<unk>``, an out-of-vocabulary id) is one
        character (U+FFFD), whatever the tokenizer prints for it."""
        out, run = [], []
        for i in ids:
            if i in self.unk_ids or not 0 <= i < self.size:
                if run:
                    out.append(self.tokenizer.decode(run))
                    run = []
                out.append("\ufffd")
            else:
                run.append(i)
        if run:
            out.append(self.tokenizer.decode(run))
        return "".join(out)

    @classmethod
    def of(cls, tokenizer) -> TagVocab:
        """The cached vocab of ``tokenizer`` (rebuilt when the tokenizer grew, e.g. after ``add_npr_tokens``)."""
        return _CACHE.get(cls, tokenizer)


class _VocabCache:
    """``id(tokenizer) -> TagVocab``: weak entries, plus strong ones for the ``_RECENT`` latest tokenizers."""

    def __init__(self, recent: int = _RECENT):
        self._weak: weakref.WeakValueDictionary[int, TagVocab] = weakref.WeakValueDictionary()
        self._recent: OrderedDict[int, TagVocab] = OrderedDict()
        self._n = recent
        self._lock = threading.Lock()

    def get(self, cls, tokenizer) -> TagVocab:
        key = id(tokenizer)
        with self._lock:
            hit = self._weak.get(key)
        # the vocab holds its tokenizer, so a live entry under this id is this tokenizer's (the `is` is a guard)
        if hit is None or hit.tokenizer is not tokenizer or type(hit) is not cls or hit.size != len(tokenizer):
            hit = cls(tokenizer)
        with self._lock:
            self._weak[key] = hit
            self._recent[key] = hit
            self._recent.move_to_end(key)
            while len(self._recent) > self._n:
                self._recent.popitem(last=False)
        return hit

    def clear(self) -> None:
        with self._lock:
            self._weak.clear()
            self._recent.clear()


_CACHE = _VocabCache()
