"""Everything bt-ray knows about the ``[RESET]`` token, in one module.

Data recipes, evaluation, serving and attacks all import from here, so the token's semantics cannot
drift between them:

* registration: ``[RESET]`` is one special token added to the tokenizer (or an existing reserved
  token reused), the embedding matrix is resized to a multiple of 64, and the new input and output
  rows start at the mean of the existing rows (``add_reset_token``, ``resize_embeddings``);
* encoding: user text never produces the ``[RESET]`` id (nor any other control token), even when it
  contains the literal string; chat prompts are tokenized piece by piece so the boundary between
  template and content is exact (``encode_text``, ``encode_chat_prompt``, ``end_of_turn_ids``);
* decoding: what a user is shown is the text after the last ``[RESET]`` (``split_at_reset``).

Shape legend for tensor code: V vocab rows, D hidden size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

RESET_TOKEN = "[RESET]"

# ChatML, used when a tokenizer has no chat template of its own (e.g. base checkpoints).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

# Stands in for message contents while a chat template is rendered; cannot occur in real text.
_SENTINEL = "\x00BTRAY{}\x00"


@dataclass(frozen=True, slots=True)
class ResetInfo:
    """How ``[RESET]`` was registered on a tokenizer.

    Attributes:
        token: the token's text (``[RESET]`` unless a reserved token is reused).
        token_id: its id.
        num_added_tokens: tokens this call added to the tokenizer (0 when already present/reused).
    """

    token: str
    token_id: int
    num_added_tokens: int


def add_reset_token(tokenizer, *, token: str = RESET_TOKEN, reuse_token: str | None = None) -> ResetInfo:
    """Register ``[RESET]`` on ``tokenizer`` as a single special token; idempotent.

    Args:
        tokenizer: a Hugging Face tokenizer (modified in place).
        token: the text of the new special token.
        reuse_token: an existing token (e.g. ``<|reserved_special_token_0|>``) to use as
            ``[RESET]`` instead of adding one; it must already be in the vocabulary.

    Returns:
        The token's text and id and how many tokens were added.

    Raises:
        ValueError: ``reuse_token`` is not a single token of the vocabulary.
    """
    if reuse_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(reuse_token)
        if token_id is None or token_id == tokenizer.unk_token_id or token_id >= len(tokenizer):
            raise ValueError(
                f"model.reuse_token must be a token already in the vocabulary; got {reuse_token!r}"
            )
        if reuse_token not in tokenizer.all_special_tokens:
            # Mark it special so user text cannot produce it and decoding can hide it.
            tokenizer.add_special_tokens(
                {"extra_special_tokens": [reuse_token]}, replace_extra_special_tokens=False
            )
        return ResetInfo(token=reuse_token, token_id=token_id, num_added_tokens=0)
    if token in tokenizer.get_vocab():
        if token not in tokenizer.all_special_tokens:
            raise ValueError(
                f"{token!r} is in the vocabulary as an ordinary token; user text could produce it. "
                "Pick another model.reset_token or set model.reuse_token."
            )
        return ResetInfo(token=token, token_id=tokenizer.convert_tokens_to_ids(token), num_added_tokens=0)
    num_added = _add_special(tokenizer, [token])
    return ResetInfo(token=token, token_id=tokenizer.convert_tokens_to_ids(token), num_added_tokens=num_added)


def _add_special(tokenizer, tokens: list[str]) -> int:
    """Add special tokens without replacing the tokenizer's existing extra special tokens."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if not missing:
        return 0
    return tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)


def ensure_chat_template(tokenizer, template: str | None = None) -> bool:
    """Make sure the tokenizer has a chat template; returns True when ChatML was installed.

    A configured ``template`` always wins. Without one, the tokenizer's own template is kept; a
    tokenizer with none gets ChatML (adding ``<|im_start|>``/``<|im_end|>`` as special tokens).
    """
    if template is not None:
        tokenizer.chat_template = template
        return False
    if tokenizer.chat_template:
        return False
    _add_special(tokenizer, list(CHATML_SPECIAL_TOKENS))
    tokenizer.chat_template = CHATML_TEMPLATE
    return True


@torch.no_grad()
def resize_embeddings(model, num_tokens: int, num_old_tokens: int, *, pad_to_multiple_of: int = 64) -> None:
    """Resize input/output embeddings for ``num_tokens`` and initialise the new rows to the mean.

    The matrix is padded to a multiple of ``pad_to_multiple_of`` rows (small matrices that are not
    multiples of 64 have been seen to destabilise training). Rows ``num_old_tokens`` and above, the
    added tokens and the padding, start at the mean of the old rows, for the input embeddings and
    for an untied output head alike. Tied embeddings stay tied.

    Args:
        model: a ``PreTrainedModel``.
        num_tokens: ``len(tokenizer)`` after adding tokens.
        num_old_tokens: rows that held trained embeddings before (the old ``len(tokenizer)``).
        pad_to_multiple_of: row multiple for the resized matrices.
    """
    old_rows = model.get_input_embeddings().weight.shape[0]
    if num_tokens <= old_rows and old_rows % pad_to_multiple_of == 0:
        return  # already has room, e.g. a reused token or a model saved by bt-ray
    # mean_resizing=False: we set the new rows ourselves, deterministically.
    model.resize_token_embeddings(num_tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    num_known = min(num_old_tokens, old_rows)
    emb_VD = model.get_input_embeddings().weight
    emb_VD[num_known:] = emb_VD[:num_known].mean(dim=0, keepdim=True)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb_VD.data_ptr():
        head_VD = head.weight
        head_VD[num_known:] = head_VD[:num_known].mean(dim=0, keepdim=True)
        if getattr(head, "bias", None) is not None:
            head.bias[num_known:] = head.bias[:num_known].mean()
    model.config.vocab_size = emb_VD.shape[0]


# ---------------------------------------------------------------- encoding


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of user or model text; control tokens in ``text`` are never matched.

    The literal string ``[RESET]`` (or ``<|im_end|>``) in a prompt or response is encoded as the
    ordinary characters it is made of, so data cannot smuggle control tokens in.
    """
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_chat_prompt(
    tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a chat prompt: the template's own tokens plus safely encoded contents.

    The template is rendered with sentinels in place of message contents; the template text between
    sentinels is tokenized normally (so ``<|im_start|>`` is one token) and each content with
    ``encode_text``. Nothing is added beyond what the template renders (no double BOS).
    """
    placeholders = [
        {"role": m["role"], "content": _SENTINEL.format(i)} for i, m in enumerate(messages)
    ]
    rendered = tokenizer.apply_chat_template(
        placeholders, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ids: list[int] = []
    rest = rendered
    for i, m in enumerate(messages):
        sentinel = _SENTINEL.format(i)
        before, found, rest = rest.partition(sentinel)
        if not found:
            raise ValueError(
                "the chat template changes message contents (a sentinel did not survive rendering); "
                "set model.chat_template to a template that inserts message['content'] as is"
            )
        ids += _encode_template_text(tokenizer, before)
        ids += encode_text(tokenizer, m["content"])
    ids += _encode_template_text(tokenizer, rest)
    return ids


def _encode_template_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that close an assistant turn in this tokenizer's chat template.

    Found by rendering an assistant turn and reading what the template puts after its content, up
    to trailing whitespace (ChatML: ``<|im_end|>``; Llama 3: ``<|eot_id|>``). Falls back to EOS for
    templates that close the turn with nothing.
    """
    sentinel = _SENTINEL.format("eot")
    prompt = [{"role": "user", "content": "x"}]
    with_turn = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": sentinel}], tokenize=False
    )
    after = with_turn.split(sentinel, 1)[1].rstrip()
    if after:
        return _encode_template_text(tokenizer, after)
    if tokenizer.eos_token_id is None:
        raise ValueError("the chat template closes assistant turns with nothing and there is no EOS token")
    warnings.warn("chat template ends assistant turns with nothing; using the EOS token", stacklevel=2)
    return [tokenizer.eos_token_id]


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class SplitOutput:
    """A generation split at its last ``[RESET]``.

    Attributes:
        shown_ids: ids after the last ``[RESET]`` (all ids when there is none): what the user sees.
        discarded_ids: ids before the last ``[RESET]``, the undone partial answer(s).
        num_resets: how many ``[RESET]`` ids the generation holds.
    """

    shown_ids: list[int]
    discarded_ids: list[int]
    num_resets: int

    @property
    def did_reset(self) -> bool:
        return self.num_resets > 0


def split_at_reset(ids: list[int], reset_id: int) -> SplitOutput:
    """Split generated ids at the last ``[RESET]`` (the shown text is what follows it)."""
    ids = list(ids)
    positions = [i for i, t in enumerate(ids) if t == reset_id]
    if not positions:
        return SplitOutput(shown_ids=ids, discarded_ids=[], num_resets=0)
    last = positions[-1]
    discarded = [t for t in ids[:last] if t != reset_id]
    return SplitOutput(shown_ids=ids[last + 1 :], discarded_ids=discarded, num_resets=len(positions))
