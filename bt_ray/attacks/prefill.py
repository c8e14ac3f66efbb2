"""The prefilling attack: the assistant turn starts with the first k tokens of a harmful answer.

This is the attack backtracking was built for (PAPER.md section 7): the model is handed a harmful
start and continues it; a backtracking model can still emit ``[RESET]`` and answer anew. Each k in
``PrefillCfg.ks`` is one ``Attempt``: the plain chat prompt (generation prompt included) followed by
the first k ids of the target, encoded as text (a literal ``[RESET]`` in a target is ordinary
characters, never the control id). The prefill is part of the answer: the runner computes the shown
answer over ``prefill + generated`` (``Policy.generate_shown``), so the prefill is shown unless the
model resets after it. k = 0 is the plain request, token for token.

Nothing is optimised: the budget is not used, and compute counts no steps or passes. A k longer than
a behaviour's target is an error; ``check_prefill`` finds every such behaviour before any task starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bt_ray.attacks.core import Attempt, Behaviour, Budget, Compute, Policy, Progress
from bt_ray.config import check
from bt_ray.reset import encode_chat_prompt, encode_text


@dataclass(frozen=True, kw_only=True, slots=True)
class PrefillCfg:
    """How much of the target the assistant turn is prefilled with."""

    ks: tuple[int, ...] = (0, 2, 4, 8)
    """Target tokens prefilled, one attempt each (0: the plain request); each at most every target's
    length in the attacked model's tokens (AdvBench's shortest target is 9 tokens with GPT-2's BPE;
    the synthetic demo world's 31, so attack_demo.yaml goes up to 20)."""

    def __post_init__(self):
        check(self, [
            ("ks", len(self.ks) > 0, "must list at least one k"),
            ("ks", all(k >= 0 for k in self.ks), "must all be >= 0"),
            ("ks", len(set(self.ks)) == len(self.ks), "must not repeat a k"),
        ])


def prefill_prompt(tokenizer, behaviour: Behaviour, k: int) -> tuple[list[int], list[int]]:
    """``(prompt_ids, prefill_ids)``: the goal as a one-turn chat prompt, then the target's first k ids.

    Raises:
        ValueError: the target has fewer than k tokens.
    """
    target = encode_text(tokenizer, behaviour.target)
    if k > len(target):
        raise ValueError(_too_long(behaviour, k, len(target)))
    prompt = encode_chat_prompt(tokenizer, [{"role": "user", "content": behaviour.goal}])
    prefill = target[:k]
    return prompt + prefill, prefill


class PrefillAttack:
    """One attempt per k: the assistant turn prefilled with the target's first k tokens."""

    kind = "prefill"

    def __init__(self, cfg: PrefillCfg):
        self.cfg = cfg

    def attack(self, policy: Policy, behaviour: Behaviour, budget: Budget,
               progress: Progress) -> list[Attempt]:
        del budget, progress  # nothing is searched: the attempts follow from the target alone
        attempts = []
        for k in self.cfg.ks:
            start = time.perf_counter()
            prompt, prefill = prefill_prompt(policy.tokenizer, behaviour, k)
            attempts.append(Attempt(
                variant=f"k={k}", prompt_ids=prompt, prefill_ids=prefill, placed_ids=list(prefill),
                adversarial_text=policy.tokenizer.decode(prefill),
                compute=Compute(seconds=time.perf_counter() - start),
            ))
        return attempts


def check_prefill(cfg: PrefillCfg, tokenizer, behaviours: list[Behaviour]) -> None:
    """Raise, before any task starts, if some k is longer than some behaviour's target (in ``tokenizer``'s
    tokens); the message names each such behaviour's location, its target length and the k.

    Raises:
        ValueError: listing every behaviour whose target is shorter than the largest k.
    """
    k_max = max(cfg.ks)
    short = []
    for b in behaviours:
        n = len(encode_text(tokenizer, b.target))
        if n < k_max:
            short.append((b, n))
    if not short:
        return
    lines = [_too_long(b, min(k for k in cfg.ks if k > n), n) for b, n in short[:10]]
    more = f"\n  ... and {len(short) - 10} more" if len(short) > 10 else ""
    shortest = min(n for _, n in short)
    raise ValueError(
        f"prefill ks={list(cfg.ks)}: {len(short)} of {len(behaviours)} behaviour targets are shorter than "
        f"k={k_max} tokens (the shortest has {shortest}); lower the ks or use longer targets "
        "(behaviours.dataset hh-rlhf or synthetic):\n  " + "\n  ".join(lines) + more)


def _too_long(behaviour: Behaviour, k: int, n: int) -> str:
    return (f"{behaviour.location} (behaviour {behaviour.id}): prefill k={k} is beyond its target's "
            f"{n} tokens")
