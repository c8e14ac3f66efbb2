"""TRL's DPOTrainer, fed our token-level preference rows unchanged."""

from __future__ import annotations

from trl import DPOTrainer


class TokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer that keeps rows which already carry ``prompt_ids``/``chosen_ids``/``rejected_ids``.

    TRL 1.16 always re-tokenizes preference data from text in ``_prepare_dataset`` (appending EOS,
    re-encoding the prompt): that would turn a literal "[RESET]" in user text into the control token,
    re-split the prompt/prefix boundary and add a second end of turn. Only that method is replaced;
    rows without the id columns still take TRL's path.

    ``_prepare_dataset`` is private, but TRL 1.16's DPO has no public way to skip it: ``__init__``
    skips it only for vision datasets (``skip_prepare_dataset = self._is_vision_dataset``), while
    SFTTrainer takes ``dataset_kwargs={"skip_prepare_dataset": True}``. Because this relies on the
    private method's name, signature and call site, pyproject pins ``trl>=1.16,<1.17``; a TRL
    upgrade must re-check them (``tests/unit/test_train_dpo_rows.py`` fails if rows are
    re-tokenized). The upstream fix to ask for: the same ``skip_prepare_dataset`` for DPOConfig.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
