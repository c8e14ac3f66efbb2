"""Decoding with ``[RESET]``: the logits processor, splitting output at the last reset, what is shown.

Part of ``bt_ray.reset`` (which re-exports every name here); its own module to keep each file short.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

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


# ---------------------------------------------------------------- backtracking decoding
#
# Decoding with [RESET] (PAPER.md section 5): a logits processor adds a bias b to the [RESET] logit
# and, once ``max_resets`` resets have been generated, sets it to -inf. Generation goes on in the
# same context and KV cache after a reset: nothing is re-encoded. The user is shown the ids after
# the last [RESET]. Shape legend for this section: B batch rows, T sequence positions, V vocab.


class ResetLogitsProcessor:
    """HF ``LogitsProcessor``: bias on the ``[RESET]`` logit, and no reset past the row's limits.

    Only the generated part of each row is counted (positions from ``prompt_length`` on), so a
    prompt can never use up a row's resets. Every other logit is left untouched.

    A reset is possible in a row while it has fewer than ``max_resets`` resets and, with a
    ``window``, while fewer than ``window`` ids have been generated since the start or the last
    reset. The window is what lets a streaming server hold back only ``window`` ids: past it, the
    text so far can no longer be discarded (``bt_ray.reset.stream``).

    Args:
        reset_id: the ``[RESET]`` token id.
        bias: added to the ``[RESET]`` logit at every step (negative values make resets rarer); one
            value for the batch or one per row.
        max_resets: resets allowed per generation; None allows any number. One value or one per row.
        prompt_length: the (padded) prompt length of the batch; ids before it are not counted.
        window: ids after the start or the last reset within which a reset is possible; None: no
            window. One value or one per row.
    """

    def __init__(
        self, reset_id: int, *, bias: float | list[float] = 0.0, max_resets: int | None | list = 1,
        prompt_length: int = 0, window: int | None | list = None,
    ):
        for name, values in (("max_resets", max_resets), ("window", window)):
            for v in _as_list(values):
                if v is not None and v < 0:
                    raise ValueError(f"{name} must be >= 0 or None; got {v!r}")
        self.reset_id = reset_id
        self.bias = [float(b) for b in bias] if isinstance(bias, list) else float(bias)
        self.max_resets = max_resets
        self.window = window
        self.prompt_length = prompt_length
        self._limited = any(v is not None for v in [*_as_list(max_resets), *_as_list(window)])
        self._windowed = any(v is not None for v in _as_list(window))
        self._has_bias = any(_as_list(self.bias))
        # Per-row limits as Python lists and the bias as a tensor, built on the first step of a batch
        # size (the bias needs the batch's device).
        self._rows: tuple[int, list[float], list[float]] | None = None
        self._bias: tuple[int, torch.device, torch.Tensor] | None = None
        # Resets per row and ids since the last reset, kept up to date in Python from the one new id
        # of each step (a full recount when the call is not the next step of the same generation), so
        # a step costs O(batch), not O(length), and no tensor op beyond reading the new ids: on a small
        # model a decoding step takes ~2 ms and every op the processor runs shows in its throughput.
        self._num_resets: list[int] | None = None
        self._since_reset: list[int] | None = None
        self._blocked: list[int] = []
        self._seen_length = -1

    @staticmethod
    def _per_row(value, batch: int, none: float) -> list[float]:
        values = value if isinstance(value, list) else [value] * batch
        if len(values) != batch:
            raise ValueError(f"{len(values)} per-row values for a batch of {batch}")
        return [none if v is None else float(v) for v in values]

    def _limits(self, batch: int) -> tuple[list[float], list[float]]:
        """``(max_resets per row, window per row)``, None as inf, built once per batch size."""
        if self._rows is None or self._rows[0] != batch:
            inf = float("inf")
            self._rows = (batch, self._per_row(self.max_resets, batch, inf),
                          self._per_row(self.window, batch, inf))
        return self._rows[1], self._rows[2]

    def _bias_B(self, batch: int, device) -> torch.Tensor:
        if self._bias is None or self._bias[:2] != (batch, device):
            self._bias = (batch, device, torch.tensor(self._per_row(self.bias, batch, 0.0), device=device))
        return self._bias[2]

    def _blocked_rows(self, input_ids_BT: torch.Tensor) -> list[int]:
        """Rows whose ``[RESET]`` is barred at this step, from counts kept up to date with each step's
        one new id (a full recount when the call is not the next step of the same generation)."""
        length, batch = input_ids_BT.shape[1], input_ids_BT.shape[0]
        max_resets, window = self._limits(batch)
        known, since, rid = self._num_resets, self._since_reset, self.reset_id
        if known is not None and length == self._seen_length + 1 and len(known) == batch:
            last = input_ids_BT[:, -1].tolist()
            changed = rid in last
            if changed:
                known = [k + (t == rid) for k, t in zip(known, last)]
            if self._windowed:  # without a window the ids since the last reset never matter
                since = [0 if t == rid else s + 1 for t, s in zip(last, since)]
                changed = True
        else:
            known, since, changed = [], [], True
            for row in input_ids_BT[:, self.prompt_length :].tolist():
                positions = [i for i, t in enumerate(row) if t == rid]
                known.append(len(positions))
                since.append(len(row) - 1 - positions[-1] if positions else len(row))  # ids after the last
        self._num_resets, self._since_reset, self._seen_length = known, since, length
        if changed:
            self._blocked = [row for row, (n, s, m, w) in enumerate(zip(known, since, max_resets, window))
                             if n >= m or s >= w]
        return self._blocked

    def __call__(self, input_ids_BT: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        blocked = self._blocked_rows(input_ids_BT) if self._limited else []
        if not self._has_bias and not blocked:
            return scores_BV  # nothing to change: no copy of the logits
        scores_BV = scores_BV.clone()
        if self._has_bias:
            bias_B = self._bias_B(input_ids_BT.shape[0], scores_BV.device)
            scores_BV[:, self.reset_id] += bias_B.to(dtype=scores_BV.dtype)
        if blocked:
            scores_BV[blocked, self.reset_id] = float("-inf")
        return scores_BV


# transformers' LogitsProcessorList runs inspect.signature on every processor at every decoding step
# (to pass extra kwargs); a precomputed signature makes that a lookup (~6 us a step, ~0.3% on the tiny model).
ResetLogitsProcessor.__call__.__signature__ = inspect.signature(ResetLogitsProcessor.__call__)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


@dataclass(frozen=True, slots=True)
class BacktrackOutput:
    """One generation after backtracking post-processing.

    Attributes:
        raw_ids: every generated id up to (not including) the first stop id: the discarded part,
            the ``[RESET]`` ids and the shown part.
        shown_ids: ids after the last ``[RESET]``: what the user sees.
        num_resets: ``[RESET]`` ids generated.
        num_discarded_tokens: ids before the last ``[RESET]`` that are not ``[RESET]`` themselves.
        first_kept_index: index in ``raw_ids`` of the first shown id (0 without a reset); the time
            to the first kept token is the time at which this id was generated.
        stopped: whether generation ended with a stop id (False: it hit the token limit).
    """

    raw_ids: list[int]
    shown_ids: list[int]
    num_resets: int
    num_discarded_tokens: int
    first_kept_index: int
    stopped: bool

    @property
    def did_reset(self) -> bool:
        return self.num_resets > 0


def backtrack_output(
    ids: list[int], reset_id: int, stop_ids: tuple[int, ...] | list[int] = ()
) -> BacktrackOutput:
    """Post-process generated ids: cut at the first stop id, then split at the last ``[RESET]``.

    Args:
        ids: generated ids (without the prompt); anything after the first stop id (an end-of-turn
            id, or padding of a finished row in a batch) is dropped.
        reset_id: the ``[RESET]`` id.
        stop_ids: ids that end a turn (``end_of_turn_ids``, EOS).
    """
    ids = list(ids)
    stops = set(stop_ids)
    stopped = False
    for i, t in enumerate(ids):
        if t in stops:
            ids, stopped = ids[:i], True
            break
    split = split_at_reset(ids, reset_id)
    first_kept = len(ids) - len(split.shown_ids) if split.did_reset else 0
    return BacktrackOutput(
        raw_ids=ids, shown_ids=split.shown_ids, num_resets=split.num_resets,
        num_discarded_tokens=len(split.discarded_ids), first_kept_index=first_kept, stopped=stopped,
    )


def clean_control_text(tokenizer, text: str) -> str:
    """Remove every special token's literal text (``[RESET]``, ``<|im_end|>``, ...) from ``text``.

    A judge reads text; control strings spelled out by the model (or left by decoding) could steer
    it, so judges only ever see text passed through here. Every special added token counts, not
    only the named ones: Llama 3 lists ``<|start_header_id|>`` or ``<|reserved_special_token_0|>``
    only as special added tokens.
    """
    for token in control_strings(tokenizer):
        text = text.replace(token, "")
    return text


def control_strings(tokenizer) -> list[str]:
    """The literal text of every special token, longest first (what ``clean_control_text`` removes)."""
    control = set(tokenizer.all_special_tokens)
    control |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted((t for t in control if t), key=len, reverse=True)


def shown_text(tokenizer, output: BacktrackOutput) -> str:
    """The text the user is shown: the shown ids decoded without control tokens, cleaned."""
    return clean_control_text(tokenizer, tokenizer.decode(output.shown_ids, skip_special_tokens=True)).strip()


def raw_text(tokenizer, output: BacktrackOutput) -> str:
    """All generated text, discarded part and ``[RESET]`` included (for inspection, never for judging)."""
    return tokenizer.decode(output.raw_ids, skip_special_tokens=False)


# vLLM V1 keys of SamplingParams.extra_args read by the vLLM processor (bt_ray.reset.vllm).
VLLM_RESET_ID_ARG = "bt_ray_reset_id"
VLLM_MAX_RESETS_ARG = "bt_ray_max_resets"
VLLM_RESET_WINDOW_ARG = "bt_ray_reset_window"


def vllm_sampling_extra_args(reset_id: int, max_resets: int | None, window: int | None = None) -> dict | None:
    """``SamplingParams.extra_args`` that make ``VllmResetLimitProcessor`` limit a request's resets.

    ``max_resets``: resets allowed (None: any number); ``window``: a reset is possible only within
    this many ids after the start or the last reset (None: anywhere), as ``ResetLogitsProcessor``.
    """
    if max_resets is None and window is None:
        return None
    args = {VLLM_RESET_ID_ARG: int(reset_id)}
    if max_resets is not None:
        args[VLLM_MAX_RESETS_ARG] = int(max_resets)
    if window is not None:
        args[VLLM_RESET_WINDOW_ARG] = int(window)
    return args
