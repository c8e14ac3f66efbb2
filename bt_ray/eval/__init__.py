"""Evaluation: backtracking decoding on HF or vLLM engines, a Ray Data pipeline, judges, metrics.

* ``engines``: the ``Generator`` protocol and its HF transformers and vLLM implementations;
* ``judges``: the ``Judge`` protocol: Llama Guard 2, a refusal-prefix stand-in, the synthetic
  world's exact judge, an LLM-as-judge over any OpenAI-compatible endpoint;
* ``pipeline``: prompts -> generation on an actor pool -> post-processing -> judge -> rows;
* ``metrics``: unsafe rates with 95% CIs, reset rates, discarded tokens, throughput, time to the
  first kept token, worst-of-k;
* ``report``: flat MLflow metric names, the bias-sweep trade-off plot, the side-by-side table;
* ``config``: ``EvalCfg``, the config of ``jobs/eval.py``.
"""
