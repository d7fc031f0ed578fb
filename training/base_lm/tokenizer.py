"""The tokenizer of tinystories-mini: a byte-level BPE trained on the train stories, and story encoding."""

from __future__ import annotations

from training.base_lm.config import EOT


def train_tokenizer(stories: list[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE tokenizer trained on `stories`, wrapped as a `PreTrainedTokenizerFast`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError("vocab_size must be at least 257 (256 bytes + <|endoftext|>)")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(stories, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return tok


def check_byte_level(tok) -> None:
    """Any Unicode text must round-trip through the tokenizer without unknown tokens."""
    for text in ("Lily saw a 🐶 and said “你好!” — café. <|endoftext|>", "\t\n  x  \u200b"):
        ids = tok.encode(text)
        back = tok.decode(ids)
        if back != text:
            raise AssertionError(f"tokenizer does not round-trip {text!r}: got {back!r}")


def encode_stories(tok, stories: list[str]) -> list[list[int]]:
    """Token ids of each story followed by `<|endoftext|>` (stories longer than the context are fine: packed)."""
    from training.lm_eval import encode_quietly

    eot = tok.convert_tokens_to_ids(EOT)
    return [[*ids, eot] for ids in encode_quietly(tok, stories)]
