"""lorafit: budgeted LoRA fine-tuning of text classifiers."""

__version__ = "0.1.0"
