"""`peft_model`: peft's `get_peft_model` without the transformers deprecation warning it triggers.

peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on
stderr at every LoRA call (nothing a user can act on). That one warning is silenced; any other
warning still shows.
"""
from __future__ import annotations

import warnings


def peft_model(model, config):
    """`peft.get_peft_model(model, config)` with the `is_gradient_checkpointing` FutureWarning silenced."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)
