"""Training stage: data pipeline, SFT recipe with full / freeze / peft methods, evaluation, merge."""
