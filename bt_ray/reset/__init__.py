"""Everything bt-ray knows about the ``[RESET]`` token, in one package: this module (registration,
encoding), ``decode.py`` (the logits processor, splitting, what is shown; re-exported here),
``stream.py`` (what a streaming client may see) and ``vllm.py`` (the vLLM logits processors, which
import vLLM).

Data recipes, evaluation, serving and attacks all import from here, so the token's semantics cannot
drift between them:

* registration: ``[RESET]`` is one special token added to the tokenizer (or an existing reserved
  token reused), the embedding matrix is resized to a multiple of 64, and the new input and output
  rows start at the mean of the existing rows (``add_reset_token``, ``resize_embeddings``);
* encoding: user text never produces the ``[RESET]`` id (nor any other control token), even when it
  contains the literal string; chat prompts are tokenized piece by piece so the boundary between
  template and content is exact (``encode_text``, ``encode_chat_prompt``, ``end_of_turn_ids``);
* decoding: a bias on ``[RESET]``, at most ``max_resets`` resets, optionally only within
  ``reset_window`` tokens (``ResetLogitsProcessor``); what a user is shown is the text after the last
  ``[RESET]`` (``split_at_reset``, ``backtrack_output``, ``shown_text``);
* streaming: ``hold`` sends nothing a later reset discards, ``retract`` says what to drop
  (``bt_ray.reset.stream.ResetStream``).

Shape legend for tensor code: V vocab rows, D hidden size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from bt_ray.reset.decode import (  # decoding has its own module; its names are re-exported here
    VLLM_MAX_RESETS_ARG,
    VLLM_RESET_ID_ARG,
    VLLM_RESET_WINDOW_ARG,
    BacktrackOutput,
    ResetLogitsProcessor,
    SplitOutput,
    backtrack_output,
    clean_control_text,
    control_strings,
    raw_text,
    shown_text,
    split_at_reset,
    vllm_sampling_extra_args,
)

RESET_TOKEN = "[RESET]"

# ChatML, used when a tokenizer has no chat template of its own (e.g. base checkpoints). It starts
# with the tokenizer's BOS when it has one: a base model (Llama 3) saw <|begin_of_text|> first in
# every pretraining document, and encode_chat_prompt adds nothing the template does not render.
CHATML_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

# Stands in for message contents while a chat template is rendered; cannot occur in real text.
_SENTINEL = "\x00BTRAY{}\x00"
# Padding put around each sentinel: whitespace (so a template's ``| trim`` removes it, as it would
# the content's own) that no template writes itself (U+3000, the ideographic space).
_TRIM_PROBE = "\u3000"
# The tokenizer attribute add_reset_token records its ResetInfo in (read by ``registered_reset``).
_RESET_ATTR = "_bt_ray_reset"


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

    The result is also recorded on the tokenizer (``registered_reset``), so whatever saves it
    (``bt_ray.models.save_model``) can record which token is ``[RESET]`` without being told.

    Raises:
        ValueError: ``reuse_token`` is not an added or special token of the tokenizer (an ordinary
            BPE token such as ``'Ġthe'`` is produced by plain text, so user text could reset).
    """
    if reuse_token is not None:
        if reuse_token not in tokenizer.added_tokens_encoder:
            raise ValueError(
                f"model.reuse_token must be an added or special token of the tokenizer (e.g. "
                f"<|reserved_special_token_0|>, <unused0>), which plain text never produces; got "
                f"{reuse_token!r}"
                + (", an ordinary vocabulary token" if reuse_token in tokenizer.get_vocab() else
                   ", which is not in the vocabulary")
            )
        token_id = tokenizer.added_tokens_encoder[reuse_token]
        if reuse_token not in tokenizer.all_special_tokens:
            # Mark it special so user text cannot produce it and decoding can hide it.
            tokenizer.add_special_tokens(
                {"extra_special_tokens": [reuse_token]}, replace_extra_special_tokens=False
            )
        info = ResetInfo(token=reuse_token, token_id=token_id, num_added_tokens=0)
    elif token in tokenizer.get_vocab():
        if token not in tokenizer.all_special_tokens:
            raise ValueError(
                f"{token!r} is in the vocabulary as an ordinary token; user text could produce it. "
                "Pick another model.reset_token or set model.reuse_token."
            )
        info = ResetInfo(token=token, token_id=tokenizer.convert_tokens_to_ids(token), num_added_tokens=0)
    else:
        num_added = _add_special(tokenizer, [token])
        token_id = tokenizer.convert_tokens_to_ids(token)
        info = ResetInfo(token=token, token_id=token_id, num_added_tokens=num_added)
    setattr(tokenizer, _RESET_ATTR, info)
    return info


def registered_reset(tokenizer) -> ResetInfo:
    """The ``ResetInfo`` ``add_reset_token`` registered on this tokenizer object.

    Raises:
        ValueError: no ``[RESET]`` was registered on it (a tokenizer loaded without bt-ray).
    """
    info = getattr(tokenizer, _RESET_ATTR, None)
    if info is None:
        raise ValueError(
            "this tokenizer has no [RESET] registered; load it with bt_ray.models.load_tokenizer/load_model"
        )
    return info


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
    num_known = min(num_old_tokens, old_rows)
    if num_tokens <= old_rows and old_rows % pad_to_multiple_of == 0:
        # The tokens fit in the existing (padding) rows, e.g. Qwen-style spare rows: no resize, but
        # the added tokens' rows still start at the mean, not at whatever the padding row held. The
        # other padding rows are left as they are (no token uses them). Nothing changes when no
        # token was added (a reused token, a model saved by bt-ray).
        _set_rows_to_mean(model, num_known, num_tokens)
        return
    # mean_resizing=False: we set the new rows ourselves, deterministically.
    model.resize_token_embeddings(num_tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    _set_rows_to_mean(model, num_known, model.get_input_embeddings().weight.shape[0])
    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]


def _set_rows_to_mean(model, num_known: int, end: int) -> None:
    """Rows ``num_known:end`` of the input embeddings (and an untied head) := the mean of the rows before."""
    if end <= num_known:
        return
    emb_VD = model.get_input_embeddings().weight
    emb_VD[num_known:end] = emb_VD[:num_known].mean(dim=0, keepdim=True)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb_VD.data_ptr():
        head_VD = head.weight
        head_VD[num_known:end] = head_VD[:num_known].mean(dim=0, keepdim=True)
        if getattr(head, "bias", None) is not None:
            head.bias[num_known:end] = head.bias[:num_known].mean()


# ---------------------------------------------------------------- encoding


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of user or model text; control tokens in ``text`` are never matched.

    The literal string ``[RESET]`` (or ``<|im_end|>``) in a prompt or response is encoded as the
    ordinary characters it is made of, so data cannot smuggle control tokens in.
    """
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_completion_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a raw (non-chat) prompt: the tokenizer's BOS, when it adds one, then ``encode_text``.

    As for chat prompts, the literal ``[RESET]`` or any other control token's text in ``text`` is
    encoded as the ordinary characters it is made of.
    """
    # What the tokenizer adds in front, if it adds a BOS (Llama 3 does; GPT-2 and SmolLM2 do not).
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = [i for i in added[:1] if i == tokenizer.bos_token_id and i is not None]
    return bos + encode_text(tokenizer, text)


def encode_chat_prompt(
    tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a chat prompt: the template's own tokens plus safely encoded contents.

    The template is rendered with sentinels in place of message contents; the template text between
    sentinels is tokenized normally (so ``<|im_start|>`` is one token) and each content with
    ``encode_text``. Nothing is added beyond what the template renders: a BOS comes from the
    template only (Llama 3, Gemma, the ChatML fallback), never a second time from the tokenizer.
    A template that trims contents (``message['content'] | trim``: Llama 3, Gemma) gets them
    trimmed: each sentinel is rendered between whitespace probes, and a side whose probe the
    template removed is stripped from the content.
    """
    placeholders = [
        {"role": m["role"], "content": _TRIM_PROBE + _SENTINEL.format(i) + _TRIM_PROBE}
        for i, m in enumerate(messages)
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
        content = m["content"]
        if before.endswith(_TRIM_PROBE):
            before = before.removesuffix(_TRIM_PROBE)
        else:
            content = content.lstrip()
        if rest.startswith(_TRIM_PROBE):
            rest = rest.removeprefix(_TRIM_PROBE)
        else:
            content = content.rstrip()
        ids += _encode_template_text(tokenizer, before)
        ids += encode_text(tokenizer, content)
    ids += _encode_template_text(tokenizer, rest)
    return ids


def chat_prompt_parts(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int], list[int]]:
    """``encode_chat_prompt`` split around the last message's content: ``(before, content, after)``.

    ``before + content + after == encode_chat_prompt(tokenizer, messages)``. Attacks that edit the
    user turn at the token level (a GCG suffix goes right after ``content``) build on it, so the
    template's own tokens and the safe encoding of the content are exactly those of a chat request.
    """
    sentinel = "\x00BTRAYPART\x00"
    *history, last = messages
    full = encode_chat_prompt(tokenizer, messages)
    # the same conversation with a sentinel as the last content: the template's ids on either side
    probe = encode_chat_prompt(tokenizer, [*history, {**last, "content": sentinel}])
    sentinel_ids = encode_text(tokenizer, sentinel)
    for start in range(len(probe) - len(sentinel_ids) + 1):
        if probe[start : start + len(sentinel_ids)] == sentinel_ids:
            before, after = probe[:start], probe[start + len(sentinel_ids) :]
            if full[: len(before)] == before and full[len(full) - len(after) :] == after:
                return before, full[len(before) : len(full) - len(after)], after
            break
    raise ValueError("cannot split this chat template's prompt around the last message's content")


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




def __getattr__(name: str):
    # ``bt_ray.reset.VllmResetLimitProcessor`` resolves lazily (from ``bt_ray.reset.vllm``), so
    # importing this package never imports vLLM.
    if name == "VllmResetLimitProcessor":
        from bt_ray.reset.vllm import VllmResetLimitProcessor

        return VllmResetLimitProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # this module, decode.py, and vllm.py's processor (lazily)
    "BacktrackOutput",
    "CHATML_SPECIAL_TOKENS",
    "CHATML_TEMPLATE",
    "RESET_TOKEN",
    "ResetInfo",
    "ResetLogitsProcessor",
    "SplitOutput",
    "VLLM_MAX_RESETS_ARG",
    "VLLM_RESET_ID_ARG",
    "VLLM_RESET_WINDOW_ARG",
    "VllmResetLimitProcessor",
    "add_reset_token",
    "backtrack_output",
    "chat_prompt_parts",
    "clean_control_text",
    "control_strings",
    "encode_chat_prompt",
    "encode_completion_prompt",
    "encode_text",
    "end_of_turn_ids",
    "ensure_chat_template",
    "raw_text",
    "registered_reset",
    "resize_embeddings",
    "shown_text",
    "split_at_reset",
    "vllm_sampling_extra_args",
]
