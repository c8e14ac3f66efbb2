"""Jailbreak attacks against backtracking and baseline models (PAPER.md section 7).

* ``core``: ``Behaviour``, ``Budget``, ``Policy`` (the model under attack), ``Attempt``, ``Compute``
  and the ``Attack`` protocol; ``check_attempt`` (no attack places a special id).
* ``prefill``: the assistant turn prefilled with k target tokens.
* ``gcg``: gradient-guided suffix search; the adaptive attack is GCG with a [RESET] term.
* ``autodan``: a genetic algorithm over readable jailbreak templates.
* ``runner``: one Ray task per (model, behaviour), budgets, resumable results, progress.
* ``report``: ASR with CIs, reset rate under attack, compute, the paper's Table 2.
"""
