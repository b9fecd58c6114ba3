"""lorafit: budgeted LoRA fine-tuning of text classifiers."""

__version__ = "0.1.0"


def load(run_dir, precision=None):
    """Load a trained run for inference: `clf = lorafit.load(run_dir)`, then `clf.predict(texts)` (class names)
    and `clf.predict_proba(texts)` (an array, texts x classes). Same numbers as `lorafit predict`.

    torch and transformers are imported on the first call, so `import lorafit` stays cheap.
    """
    from .inference.predict import load as _load

    return _load(run_dir, precision)
