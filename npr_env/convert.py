"""Text trajectories to the token form the parallel layout trains and decodes: stage 2's conversion.

Stage 1 samples sequentially, and a real model writes the tags as ordinary text pieces there. Stage 2 trains
the kept trajectories under the parallel layout, which needs every tag as its single tag token and the exact
tokens the engine produces around a fork and a join. :func:`parallel_ids` gives that form from the text:

* every tag is its tag token (the text is tokenised afresh, whatever pieces the sampler wrote);
* each ``<step>`` is followed by the engine's forced ``N:`` ids (``TagVocab.step_number_ids``), so the number
  is tokenised as the engine forces it, not merged with the text after it;
* whitespace the engine can never decode is dropped: between ``</guideline>`` and the first ``<step>`` (the
  engine forks at ``</guideline>``), between a ``</step>`` and the next ``<step>`` or the ``<takeaway>`` (a
  branch ends at its ``</step>``, the join forces ``<takeaway>``), and between ``<step>`` and its number.

Everything else is kept as written, so the verdict of the converted trajectory is the text's.
"""

from __future__ import annotations

import re

from .graph import TagVocab
from .schema import GUIDELINE_CLOSE, STEP_CLOSE, STEP_OPEN, TAGS, TAKEAWAY_OPEN

_FORK_JOIN_GAP = re.compile(rf"({re.escape(GUIDELINE_CLOSE)}|{re.escape(STEP_CLOSE)})\s+"
                            rf"(?={re.escape(STEP_OPEN)}|{re.escape(TAKEAWAY_OPEN)})")
_STEP_NUMBER = re.compile(rf"{re.escape(STEP_OPEN)}\s*(\d+(?:\.\d+)*)\s*:")
_TAG_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")


def parallel_text(text: str) -> str:
    """``text`` without the whitespace the engine cannot decode, and with ``<step>N:`` written tightly."""
    text = _FORK_JOIN_GAP.sub(r"\1", text)
    return _STEP_NUMBER.sub(lambda m: f"{STEP_OPEN}{m.group(1)}:", text)


def parallel_ids(text: str, tokenizer) -> list[int]:
    """Token ids of a response text in the parallel layout's form (see the module docstring).

    ``tokenizer`` must have the 8 tags as single tokens (``npr_env.add_npr_tokens``). Special tokens written
    in the text (an end-of-sequence marker) become their ids, as ``tokenizer.encode`` makes them.
    """
    vocab = TagVocab.of(tokenizer)
    out: list[int] = []
    after_step = False
    for piece in _TAG_SPLIT.split(parallel_text(text)):
        if not piece:
            continue
        if piece in vocab.id_of:
            out.append(vocab.id_of[piece])
            after_step = piece == STEP_OPEN
            continue
        if after_step:
            m = re.match(r"(\d+(?:\.\d+)*):", piece)
            if m:
                out.extend(vocab.step_number_ids(m.group(1)))
                piece = piece[m.end():]
        after_step = False
        if piece:
            out.extend(tokenizer.encode(piece, add_special_tokens=False))
    return out


__all__ = ["parallel_ids", "parallel_text"]
