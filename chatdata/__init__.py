"""Chat data shared by the stages: reading data files (files.py), the data pipeline (pipeline.py: clean, deduplicate,
tokenize with the chat template, length-filter, split, mix), the `data:` config section (config.py) and the prepared
splits a training artifact carries (splits.py)."""
