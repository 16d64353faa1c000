"""mechedit: mechanistic interpretability of knowledge editing and unlearning on synthetic worlds."""
__version__ = "0.1.0"


def load(directory, **kwargs):
    """Load a checkpoint directory: the HF model, its tokenizer and its world (a `Subject`)."""
    from mechedit.model.checkpoint import load_checkpoint

    return load_checkpoint(directory, **kwargs)


__all__ = ["__version__", "load"]
