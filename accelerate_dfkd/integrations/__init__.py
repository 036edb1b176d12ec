"""Bridges to the HuggingFace ecosystem, each importing its library only when used.

trainer.py     SyntheticDataset: a method's synthetic data as a torch IterableDataset for someone
               else's loop or a transformers Trainer (it runs synthesis rounds itself), plus a
               TrainerCallback that checks the Trainer's settings and logs synthesis losses.
hf_models.py   transformers vision models as teacher or student (`hf:<dir or hub id>`): logits out,
               the image processor's normalisation and resolution, BatchNorm layers visible to hooks.
datasets_io.py export a synthetic set to a `datasets.Dataset` on disk or parquet (streamed in
               chunks), and read one back as a source (DatasetSource).
"""
