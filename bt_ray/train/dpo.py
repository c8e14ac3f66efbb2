"""TRL's DPOTrainer, fed our token-level preference rows unchanged."""

from __future__ import annotations

from trl import DPOTrainer


class TokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer that keeps rows which already carry ``prompt_ids``/``chosen_ids``/``rejected_ids``.

    TRL 1.16 always re-tokenizes preference data from text in ``_prepare_dataset`` (appending EOS,
    re-encoding the prompt): that would turn a literal "[RESET]" in user text into the control token,
    re-split the prompt/prefix boundary and add a second end of turn. Only that method is replaced;
    rows without the id columns still take TRL's path.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
