"""The pipeline behind ``jobs/pipeline.py`` and ``bt-ray pipeline --preset P``.

* ``config``: ``PipelineCfg`` (what runs, on one page) and the presets (``jobs/configs/pipeline_<P>.yaml``);
* ``runner``: runs each stage once per resolved config (``<run_dir>/stages/<stage>.json`` markers), so a
  rerun skips what is done and resumes at the stage that was running;
* ``console``: the quiet terminal: one line per stage start and end, a progress bar, everything else
  (Ray, vLLM, transformers) into ``<run_dir>/logs/<stage>.log``;
* ``stages``: the config each stage's job runs with, derived from the pipeline's model and world;
* ``results``: Table 1 and the plain-words comparison printed at the end.
"""
