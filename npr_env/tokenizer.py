"""The shipped character-level tokenizer, and the helper that adds the NPR tags to any HF tokenizer.

The shipped tokenizer (``assets/npr_char_tokenizer.json``) maps every printable ASCII character, newline and
tab to one token, and every NPR tag, chat marker, ``<eos>`` and ``<pad>`` to one special token. It is what the
tiny preset and the tests use, so no download is ever needed. ``python -m npr_env.tokenizer`` rebuilds it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .schema import TAG_NAMES, TAGS

ASSET = Path(__file__).parent / "assets" / "npr_char_tokenizer.json"
PAD, EOS, UNK, USER, ASSISTANT = "<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer_json(path: Path = ASSET) -> Path:
    """Write the character-level tokenizer file (deterministic: same bytes every time)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = [PAD, EOS, UNK, USER, ASSISTANT, *TAGS]
    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@functools.lru_cache(maxsize=1)
def _load_cached():
    from transformers import PreTrainedTokenizerFast

    if not ASSET.exists():
        raise FileNotFoundError(f"{ASSET} is missing; rebuild it with `python -m npr_env.tokenizer`")
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSET), pad_token=PAD, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, *TAGS],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def load_tokenizer():
    """The shipped NPR tokenizer (a ``PreTrainedTokenizerFast``; every tag is one token)."""
    return _load_cached()


def add_npr_tokens(tokenizer, model=None) -> list[int]:
    """Add the 8 tags to ``tokenizer`` as special tokens and, if ``model`` is given, initialise their rows.

    Each new input-embedding row (and lm_head row, when the head is untied) is the mean of the embeddings of
    the tag name's sub-tokens: ``guideline`` for ``<guideline>``, ``/guideline`` for ``</guideline>``.
    Tags that are already single tokens are left alone. Returns the ids of the 8 tags.
    """
    existing = {t for t in TAGS if t in tokenizer.get_vocab()}
    new = [t for t in TAGS if t not in existing]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in TAGS]
    if model is not None and new:
        init_tag_rows(tokenizer, model, new)
    return ids


def init_tag_rows(tokenizer, model, tags=TAGS) -> None:
    """Set each tag's embedding row (and lm_head row, when untied) to the mean of its name's sub-token rows.

    The model is resized first when a tag id lies beyond its embedding (Qwen3's 151,936 rows already leave
    room for the tags at 151,669..151,676).
    """
    import torch

    tag_ids = {tokenizer.convert_tokens_to_ids(t) for t in TAGS}
    old_rows = model.get_input_embeddings().weight.shape[0]
    if max(tag_ids) >= old_rows:
        model.resize_token_embeddings(len(tokenizer))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == emb.data_ptr()
    with torch.no_grad():
        for tag in tags:
            sub = tokenizer.encode(TAG_NAMES[tag], add_special_tokens=False)
            sub = [s for s in sub if s < old_rows and s not in tag_ids] or [0]
            row = tokenizer.convert_tokens_to_ids(tag)
            emb[row] = emb[sub].mean(0)
            if not tied:
                head.weight[row] = head.weight[sub].mean(0)


if __name__ == "__main__":
    print(build_tokenizer_json())
