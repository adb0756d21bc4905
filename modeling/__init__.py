"""Model loading shared by the stages: the built-in base model, tokenizers, attention kernels (model.py) and batch
collation with answer-only loss and shared-prefix caching (collate.py)."""
