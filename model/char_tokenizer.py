"""A character-level tokenizer for the tiny models moetune builds from configs.

Ids 0-2 are <|begin|>, <|end|>, <|pad|> (DeepSeek's configs use bos 0, eos 1); then every
printable ASCII character and the newline, one id each: 98 ids, so a vocab of 128 holds it.
Built with the `tokenizers` library, so it saves as tokenizer.json and loads in
transformers' PreTrainedTokenizerFast (and hence TRL and vLLM).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<|begin|>", "<|end|>", "<|pad|>")
CHARACTERS = "".join(c for c in string.printable if c.isprintable()) + "\n"


def char_tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in CHARACTERS:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' }}{% generation %}{{ message['content'] + '<|end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def char_tokenizer_fast():
    """The character tokenizer as transformers' PreTrainedTokenizerFast, with bos/eos/pad set
    and a plain-text chat template (`User: ...` / `Assistant: ...<|end|>`), for TRL and vLLM."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=char_tokenizer(),
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        unk_token=SPECIAL_TOKENS[2],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )
