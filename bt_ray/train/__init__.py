"""Training: SFT and DPO as Ray Train jobs (TRL under DeepSpeed), run by ``jobs/sft.py`` and ``jobs/dpo.py``.

* ``config``: the typed job configs (``SFTJobCfg``, ``DPOJobCfg``);
* ``batch``: global batch -> per-device batch and gradient accumulation;
* ``deepspeed``: the DeepSpeed config dict;
* ``driver``: driver-side checks, rows, checkpoints and export;
* ``loop``: ``train_loop_per_worker``, run by every Ray Train worker;
* ``callbacks``, ``dpo``: HF Trainer callbacks and the DPO trainer that keeps token-level rows.
"""
