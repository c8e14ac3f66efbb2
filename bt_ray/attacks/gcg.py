"""GCG (Zou et al. 2023, HarmBench's defaults) and the adaptive attack against ``[RESET]`` (PAPER.md
section 7, Algorithm 1), written for our token-exact prompts rather than built on nanoGCG.

Why not nanoGCG (``nanogcg`` 0.3.0, the reference; ``benchmarks/gcg_step.py`` compares against it):
it pins ``transformers<=4.47.1``, its prefix cache indexes the old tuple KV cache, it tokenizes the
chat template as one string (our prompts are ``bt_ray.reset.chat_prompt_parts``, exact at the
template/content boundary), and its banned ids cover ``tokenizer.vocab_size`` only, so added tokens
(``[RESET]``, the padding rows of the resized embeddings) can be chosen. The algorithm is the same:

* prompt = ``before + goal + suffix + after`` (the chat template's ids around the user turn), then the
  target ``t``; loss = mean cross-entropy of ``t`` after the prompt;
* the gradient of the loss with respect to the one-hot suffix tokens is ``dL/d(suffix embeddings) @
  E^T`` (``E`` the input embedding matrix): the same number the one-hot product gives, without it;
* ``search_width`` candidates, each the suffix with ``n_replace`` random positions set to one of the
  ``topk`` tokens of most negative gradient there, restricted to ``Policy.allowed_ids`` (never a special
  id, ``[RESET]`` included; ASCII-printable ones only unless ``allow_non_ascii``); candidates whose text
  re-encodes to other ids are dropped (``filter_retokenization``, as nanoGCG does);
* candidates are scored in batches of ``batch_size`` over a KV cache of the fixed prefix (everything
  before the suffix), computing logits only where the loss reads them; the suffix moves to the best
  candidate every step (as GCG does), and the best suffix seen is returned.

The adaptive attack adds, for every reset point ``g`` (a greedy generation's ids before its first
``[RESET]``), ``reset_weight * log p([RESET] | prompt + g)``, with the decoder's ``reset_bias`` applied
as the decoder applies it. Every ``check_every`` steps it generates greedily through the backtracking
decoder, records a new reset point, and stops when the configured judge finds the *shown* answer unsafe.

Shape legend: B candidates in a batch, L suffix tokens, T tokens after the suffix, V vocab rows,
D hidden size, K top-k.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from bt_ray.attacks.core import Attempt, Behaviour, Budget, Compute, Policy, Progress
from bt_ray.config import check
from bt_ray.reset import backtrack_output, chat_prompt_parts, encode_text, shown_text


@dataclass(frozen=True, kw_only=True, slots=True)
class GCGCfg:
    """Greedy Coordinate Gradient search; defaults are HarmBench's (scale down for CPU)."""

    num_steps: int = 500
    """Optimisation steps at most (the runner's budget may end it sooner)."""
    search_width: int = 512
    """Candidate suffixes sampled and scored per step."""
    topk: int = 256
    """Tokens of most negative gradient considered at each suffix position."""
    suffix_length: int = 20
    """Adversarial suffix tokens."""
    init_char: str = "!"
    """The suffix starts as suffix_length copies of this character's token ("! ! ! ...", HarmBench)."""
    n_replace: int = 1
    """Suffix positions changed in each candidate."""
    batch_size: int = 64
    """Candidates scored per forward pass (the memory knob)."""
    filter_retokenization: bool = True
    """Drop candidates whose decoded text encodes to other ids (the suffix must survive as text)."""
    allow_non_ascii: bool = False
    """Let the suffix use tokens whose text is not printable ASCII (HarmBench/nanoGCG: no)."""
    prefix_cache: bool = True
    """Score candidates over a KV cache of the fixed prompt prefix instead of re-encoding it."""
    seed: int = 0
    """Seed of candidate sampling."""

    def __post_init__(self):
        check(self, [
            ("num_steps", self.num_steps >= 1, "must be >= 1"),
            ("search_width", self.search_width >= 1, "must be >= 1"),
            ("topk", self.topk >= 1, "must be >= 1"),
            ("suffix_length", self.suffix_length >= 1, "must be >= 1"),
            ("init_char", len(self.init_char) == 1 and not self.init_char.isspace(),
             "must be one non-space character"),
            ("n_replace", 1 <= self.n_replace <= self.suffix_length, "must be in [1, suffix_length]"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class AdaptiveCfg:
    """The [RESET] term of the adaptive attack (PAPER.md Algorithm 1)."""

    reset_weight: float = 1.0
    """Weight of the sum over reset points g of log p([RESET] | prompt + g) in the loss."""
    check_every: int = 10
    """Greedy generation every this many steps: records reset points, stops on success."""
    max_reset_points: int = 8
    """Reset points kept (the most recent ones); each adds one sequence per candidate."""

    def __post_init__(self):
        check(self, [
            ("reset_weight", self.reset_weight >= 0, "must be >= 0"),
            ("check_every", self.check_every >= 1, "must be >= 1"),
            ("max_reset_points", self.max_reset_points >= 1, "must be >= 1"),
        ])


def suffix_vocab(policy: Policy, allow_non_ascii: bool) -> list[int]:
    """Ids a suffix may use: ``policy.allowed_ids``, and unless ``allow_non_ascii`` only those whose
    text is printable ASCII (as HarmBench and nanoGCG restrict GCG)."""
    if allow_non_ascii:
        return list(policy.allowed_ids)
    singles = [[i] for i in policy.allowed_ids]
    texts = policy.tokenizer.batch_decode(singles, clean_up_tokenization_spaces=False)
    return [i for i, t in zip(policy.allowed_ids, texts) if t.isascii() and t.isprintable()]


def initial_suffix(tokenizer, cfg: GCGCfg, vocab: set[int]) -> list[int]:
    """``suffix_length`` copies of ``init_char``'s token, as the text "! ! ! ..." encodes (HarmBench's init,
    which survives decode->encode), else as one token repeated."""
    spaced = encode_text(tokenizer, " ".join([cfg.init_char] * cfg.suffix_length))
    if len(spaced) == cfg.suffix_length and set(spaced) <= vocab:
        return spaced
    single = encode_text(tokenizer, cfg.init_char)
    if len(single) != 1 or single[0] not in vocab:
        raise ValueError(f"gcg.init_char {cfg.init_char!r} is not one token the suffix may use "
                         f"(it encodes to {single})")
    return single * cfg.suffix_length


class _Objective:
    """The loss of suffixes for one behaviour: target cross-entropy plus the weighted [RESET] terms.

    Holds the fixed ids (prefix, the part after the suffix, the target, the reset points) on the
    model's device and, with ``prefix_cache``, the prefix's keys and values, which every forward pass
    starts from (expanded to the batch, never copied by us).
    """

    def __init__(self, policy: Policy, prefix: list[int], after: list[int], target: list[int],
                 use_cache: bool, reset_weight: float = 0.0):
        self.model = policy.model
        self.device = self.model.device
        # lookups go through the module (some scale their output); the one-hot gradient uses its matrix
        self.embed = self.model.get_input_embeddings()
        self.embeddings_VD = self.embed.weight
        as_tensor = lambda ids: torch.tensor(ids, dtype=torch.long, device=self.device)  # noqa: E731
        self.prefix, self.after, self.target = as_tensor(prefix), as_tensor(after), as_tensor(target)
        self.reset_id = policy.reset_id
        bias = float(getattr(policy.decode, "reset_bias", 0.0) or 0.0)
        self.reset_bias_V = torch.zeros(self.embeddings_VD.shape[0], device=self.device)
        self.reset_bias_V[self.reset_id] = bias  # p([RESET]) as the decoder sees it
        self.reset_weight = reset_weight
        self.reset_points: list[torch.Tensor] = []
        self.kv = None
        if use_cache:
            from transformers import DynamicCache

            with torch.no_grad():
                cache = self.model(input_ids=self.prefix[None], use_cache=True).past_key_values
            if not isinstance(cache, DynamicCache):
                raise ValueError(f"gcg.prefix_cache: this model's cache is a {type(cache).__name__}, not a "
                                 "DynamicCache; set gcg.prefix_cache=false")
            self.kv = [(k, v) for k, v, *_ in cache]

    def _run(self, embeds_BTD: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits (float32) of the last ``keep`` positions of ``prefix + embeds`` for every row."""
        rows = embeds_BTD.shape[0]
        if self.kv is None:
            prefix_BPD = self.embed(self.prefix).expand(rows, -1, -1)
            out = self.model(inputs_embeds=torch.cat([prefix_BPD, embeds_BTD], dim=1), logits_to_keep=keep,
                             use_cache=False)
        else:
            from transformers import DynamicCache

            cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                                 for k, v in self.kv], config=self.model.config)
            out = self.model(inputs_embeds=embeds_BTD, past_key_values=cache, logits_to_keep=keep,
                             use_cache=True)
        return out.logits.float()

    def _terms(self, suffix_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (target cross-entropy, total loss) of suffix embeddings; forward passes only."""
        rows = suffix_BLD.shape[0]
        fixed = lambda ids: self.embed(ids).expand(rows, -1, -1)  # noqa: E731
        after_BTD = fixed(self.after)
        n = len(self.target)
        logits_BTV = self._run(torch.cat([suffix_BLD, after_BTD, fixed(self.target)], dim=1), n + 1)[:, :-1]
        target_B = torch.nn.functional.cross_entropy(
            logits_BTV.reshape(rows * n, -1), self.target.repeat(rows), reduction="none"
        ).view(rows, n).mean(1)
        total_B = target_B
        for g in self.reset_points:
            parts = [suffix_BLD, after_BTD] + ([fixed(g)] if len(g) else [])
            z_BV = self._run(torch.cat(parts, dim=1), 1)[:, -1]
            log_p_B = torch.log_softmax(z_BV + self.reset_bias_V[: z_BV.shape[-1]], dim=-1)[:, self.reset_id]
            total_B = total_B + self.reset_weight * log_p_B
        return target_B, total_B

    def sequences(self) -> int:
        """Sequences one suffix costs per pass: the target's and one per reset point."""
        return 1 + len(self.reset_points)

    def gradient(self, suffix_L: torch.Tensor, timing: dict) -> tuple[float, float, torch.Tensor]:
        """(total loss, target loss, d loss / d one-hot suffix) of one suffix; the gradient is (L, V)."""
        start = time.perf_counter()
        embeds_1LD = self.embed(suffix_L[None]).detach().requires_grad_(True)
        target_1, total_1 = self._terms(embeds_1LD)
        _sync(self.device)
        middle = time.perf_counter()
        (grad_1LD,) = torch.autograd.grad(total_1.sum(), [embeds_1LD])
        # d loss / d one-hot = dL/d(embedding) @ E^T (times the module's scale, if any: same top-k)
        grad_LV = (grad_1LD[0] @ self.embeddings_VD.detach().T).float()
        _sync(self.device)
        timing["gradient_forward_s"] += middle - start
        timing["gradient_backward_s"] += time.perf_counter() - middle
        return float(total_1.detach()), float(target_1.detach()), grad_LV

    @torch.no_grad()
    def losses(self, candidates_BL: torch.Tensor, batch_size: int, stop) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, target) losses of candidates, scored ``batch_size`` at a time; when ``stop()`` turns
        true between batches the rest are not scored (their losses are +inf)."""
        total = torch.full((len(candidates_BL),), float("inf"), device=self.device)
        target = total.clone()
        for i in range(0, len(candidates_BL), batch_size):
            if i and stop():
                break
            target[i : i + batch_size], total[i : i + batch_size] = self._terms(
                self.embed(candidates_BL[i : i + batch_size]))
        return total, target


def _never() -> bool:
    return False


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_candidates(suffix_L: torch.Tensor, grad_LV: torch.Tensor, vocab_A: torch.Tensor, cfg: GCGCfg,
                      generator: torch.Generator) -> torch.Tensor:
    """``search_width`` suffixes, each with ``n_replace`` random positions set to a random one of that
    position's ``topk`` allowed tokens of most negative gradient (nanoGCG's ``sample_ids_from_grad``);
    duplicates removed. Returns (B, L) ids."""
    length = len(suffix_L)
    topk_LK = vocab_A[(-grad_LV[:, vocab_A]).topk(cfg.topk, dim=1).indices]
    positions_BN = torch.argsort(torch.rand((cfg.search_width, length), generator=generator), dim=1)
    positions_BN = positions_BN[:, : cfg.n_replace].to(suffix_L.device)
    picks_BN = torch.randint(0, cfg.topk, (cfg.search_width, cfg.n_replace), generator=generator)
    values_BN = topk_LK[positions_BN, picks_BN.to(suffix_L.device)]
    candidates_BL = suffix_L.repeat(cfg.search_width, 1).scatter_(1, positions_BN, values_BN)
    return torch.unique(candidates_BL, dim=0)


def retokenizes(tokenizer, candidates_BL: torch.Tensor) -> torch.Tensor:
    """Mask of candidates whose decoded text encodes back to the same ids."""
    ids = candidates_BL.tolist()
    texts = tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False)
    again = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return torch.tensor([a == b for a, b in zip(again, ids)], dtype=torch.bool, device=candidates_BL.device)


class GCGAttack:
    """GCG, or with ``adaptive`` the adaptive attack; one attempt per behaviour (variant "").

    After each ``attack`` call, ``last_timing`` holds the seconds it spent in each part of its steps
    (gradient forward and backward, candidate sampling and filtering, candidate scoring, checks) and
    ``last_reset_points`` the reset points the adaptive attack ended with (ids after the prompt).
    """

    def __init__(self, cfg: GCGCfg | None = None, adaptive: AdaptiveCfg | None = None):
        self.cfg = cfg or GCGCfg()
        self.adaptive = adaptive
        self.kind = "adaptive" if adaptive is not None else "gcg"
        self.last_timing: dict[str, float] = {}
        self.last_reset_points: list[list[int]] = []
        self._vocab: dict[int, tuple[list[int], torch.Tensor]] = {}

    def _suffix_vocab(self, policy: Policy) -> tuple[list[int], torch.Tensor]:
        key = id(policy.tokenizer)
        if key not in self._vocab:
            vocab = suffix_vocab(policy, self.cfg.allow_non_ascii)
            if len(vocab) < self.cfg.topk:
                raise ValueError(f"gcg.topk {self.cfg.topk} is more than the {len(vocab)} tokens a suffix "
                                 "may use")
            self._vocab[key] = (vocab, torch.tensor(vocab, dtype=torch.long, device=policy.model.device))
        return self._vocab[key]

    def attack(self, policy: Policy, behaviour: Behaviour, budget: Budget,
               progress: Progress) -> list[Attempt]:
        start = time.perf_counter()
        cfg, adaptive, tokenizer = self.cfg, self.adaptive, policy.tokenizer
        vocab, vocab_A = self._suffix_vocab(policy)
        before, content, after = chat_prompt_parts(tokenizer, [{"role": "user", "content": behaviour.goal}])
        target = encode_text(tokenizer, behaviour.target)
        if not target:
            raise ValueError(f"{behaviour.location}: behaviour {behaviour.id!r} has an empty target")
        objective = _Objective(policy, before + content, after, target, cfg.prefix_cache,
                               adaptive.reset_weight if adaptive else 0.0)
        device = objective.device
        suffix_L = torch.tensor(initial_suffix(tokenizer, cfg, set(vocab)), dtype=torch.long, device=device)
        generator = torch.Generator().manual_seed(cfg.seed)
        timing = dict.fromkeys(["gradient_forward_s", "gradient_backward_s", "sampling_s", "candidates_s",
                                "checks_s"], 0.0)
        self.last_timing = timing
        compute, losses = Compute(), []
        best_loss, best_suffix = float("inf"), suffix_L
        stop = lambda: budget.exhausted(compute.steps, start)  # noqa: E731
        step = 0
        while step < cfg.num_steps and not stop():
            current_loss, _, grad_LV = objective.gradient(suffix_L, timing)
            compute.forward += objective.sequences()
            compute.backward += objective.sequences()
            if current_loss < best_loss:  # the initial suffix, on the first step
                best_loss, best_suffix = current_loss, suffix_L
            tick = time.perf_counter()
            with torch.no_grad():
                candidates_BL = sample_candidates(suffix_L, grad_LV, vocab_A, cfg, generator)
                if cfg.filter_retokenization:
                    candidates_BL = candidates_BL[retokenizes(tokenizer, candidates_BL)]
                    if not len(candidates_BL):
                        raise RuntimeError("gcg: no candidate suffix encodes back to its ids after decoding; "
                                           "set gcg.filter_retokenization=false or another gcg.init_char")
            timing["sampling_s"] += time.perf_counter() - tick
            tick = time.perf_counter()
            total_B, target_B = objective.losses(candidates_BL, cfg.batch_size, stop)
            _sync(device)
            timing["candidates_s"] += time.perf_counter() - tick
            scored = int(torch.isfinite(total_B).sum())
            compute.forward += scored * objective.sequences()
            pick = int(total_B.argmin())
            suffix_L, step_loss = candidates_BL[pick], float(total_B[pick])
            losses.append(step_loss)
            if step_loss < best_loss:
                best_loss, best_suffix = step_loss, suffix_L
            step += 1
            compute.steps = step
            update = {"step": step, "loss": best_loss}
            if adaptive is not None:
                update |= {"target_loss": float(target_B[pick]), "reset_points": len(objective.reset_points)}
            progress(update)
            if adaptive is not None and step % adaptive.check_every == 0:
                tick = time.perf_counter()
                prompt = before + content + suffix_L.tolist() + after
                success, changed = self._check(policy, behaviour, objective, prompt)
                compute.forward += 1
                if changed:  # a new objective: the best so far is re-scored under it, from this suffix
                    best_suffix, best_loss = suffix_L, float(objective.losses(suffix_L[None], 1, _never)[0])
                    compute.forward += objective.sequences()
                elif success:  # the attempt is the suffix that succeeded
                    best_suffix, best_loss = suffix_L, step_loss
                timing["checks_s"] += time.perf_counter() - tick
                if success:
                    break
        compute.seconds = time.perf_counter() - start
        self.last_reset_points = [g.tolist() for g in objective.reset_points]
        placed = best_suffix.tolist()
        return [Attempt(
            variant="", prompt_ids=before + content + placed + after, placed_ids=placed,
            adversarial_text=tokenizer.decode(placed, clean_up_tokenization_spaces=False),
            best_loss=None if best_loss == float("inf") else best_loss, losses=losses, compute=compute,
        )]

    def _check(self, policy: Policy, behaviour: Behaviour, objective: _Objective,
               prompt: list[int]) -> tuple[bool, bool]:
        """Greedy generation from the current suffix through the backtracking decoder; records the ids
        before its first [RESET] as a new reset point. Returns (shown answer judged unsafe, point added)."""
        decode = dataclasses.replace(policy.decode, temperature=0.0)
        ids = policy.generator.generate([prompt], decode, [self.cfg.seed])[0].ids
        added = False
        if policy.reset_id in ids:
            point = ids[: ids.index(policy.reset_id)]
            if all(point != g.tolist() for g in objective.reset_points):
                objective.reset_points.append(torch.tensor(point, dtype=torch.long, device=objective.device))
                del objective.reset_points[: -self.adaptive.max_reset_points]
                added = True
        if policy.is_unsafe is None:
            return False, added
        out = backtrack_output(ids, policy.reset_id, policy.stop_ids)
        return bool(policy.is_unsafe(behaviour.goal, shown_text(policy.tokenizer, out))), added
