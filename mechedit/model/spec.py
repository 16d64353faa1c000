"""`ModelSpec` (architecture, mapped to a `GPTNeoXConfig`) and `TrainSpec` (the training loop).

Presets: `default` (the embedded demo: fast to train on 2 CPU cores), `pythia-31m-like`
(6 layers, d_model 256, 8 heads, as Behemoth's Pythia-31m) and `tiny` (tests).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

from transformers import GPTNeoXConfig

from mechedit.errors import SpecError
from mechedit.specio import Range, check_fields, from_dict, load_spec_file, to_dict, validate_spec

# Training holds weights, gradients and two AdamW moments in fp32 (16 bytes per parameter): 500M
# parameters are ~8 GB before activations, what a workstation holds; beyond that we refuse up front.
MAX_PARAMETERS = 500_000_000
MAX_EPOCHS = 10_000


@dataclass(frozen=True)
class ModelSpec:
    name: str = "default"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    max_len: int = 64
    rotary_pct: float = 0.25
    parallel_residual: bool = True

    def validate(self) -> None:
        check_fields(self, "model")
        for key in ("n_layers", "d_model", "n_heads", "d_mlp", "max_len"):
            if getattr(self, key) < 1:
                raise SpecError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise SpecError(f"model.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise SpecError("model.rotary_pct must be in [0, 1]")
        self.check_size(0)

    def parameters(self, vocab_size: int) -> int:
        """Parameter count of the GPT-NeoX model (untied embedding and unembedding, biases, norms)."""
        d, f = self.d_model, self.d_mlp
        block = 3 * d * d + 3 * d + d * d + d + d * f + f + f * d + d + 4 * d
        return 2 * vocab_size * d + self.n_layers * block + 2 * d

    def check_size(self, vocab_size: int) -> None:
        n = self.parameters(vocab_size)
        if n > MAX_PARAMETERS:
            raise SpecError(f"the model would have {n:,} parameters (vocabulary {vocab_size:,}), beyond the limit "
                            f"of {MAX_PARAMETERS:,} (~8 GB of training state); lower d_model, d_mlp or n_layers")

    def hf_config(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> GPTNeoXConfig:
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=self.d_model, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, intermediate_size=self.d_mlp,
            max_position_embeddings=self.max_len, rotary_pct=self.rotary_pct,
            use_parallel_residual=self.parallel_residual, hidden_dropout=0.0, attention_dropout=0.0,
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False,
        )


@dataclass(frozen=True)
class TrainSpec:
    seed: int = 0
    max_epochs: Annotated[int, Range(1, MAX_EPOCHS)] = 60
    batch_size: int = 128
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    target_recall: float = 0.995  # early stop: cloze recall on trained facts ...
    target_paraphrase: float = 0.97  # ... and held-out-paraphrase recall (0 disables)
    eval_every: int = 5  # epochs between recall evaluations
    bf16: bool = False  # bf16 autocast (AMX); weights stay fp32. Slower than fp32 at d_model 128 (benchmarks/)

    def validate(self) -> None:
        check_fields(self, "train")
        if self.max_epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise SpecError("train.max_epochs, batch_size and eval_every must be >= 1")
        if self.warmup_steps < 0:
            raise SpecError("train.warmup_steps must be >= 0")
        if self.lr <= 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise SpecError("train.lr and grad_clip must be > 0, weight_decay >= 0")
        for key in ("target_recall", "target_paraphrase", "min_lr_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise SpecError(f"train.{key} must be in [0, 1]")


PRESETS: dict[str, ModelSpec] = {
    "default": ModelSpec("default", 4, 128, 4, 512),
    "pythia-31m-like": ModelSpec("pythia-31m-like", 6, 256, 8, 1024),
    "tiny": ModelSpec("tiny", 2, 32, 2, 64),
}

TRAIN_PRESETS: dict[str, TrainSpec] = {
    "default": TrainSpec(),
    "pythia-31m-like": TrainSpec(lr=1.5e-3, batch_size=256),
    "tiny": TrainSpec(max_epochs=60, batch_size=64, lr=1e-2, warmup_steps=20, target_recall=1.0,
                      target_paraphrase=0.0, eval_every=20, bf16=False),
}


def model_spec(name_or_path: str | None) -> tuple[ModelSpec, TrainSpec]:
    """A preset by name, or a TOML/JSON file with `[model]` (optionally `preset = ...`) and `[train]` tables."""
    if name_or_path is None:
        name_or_path = "default"
    if name_or_path in PRESETS:
        return PRESETS[name_or_path], TRAIN_PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.suffix:
        raise SpecError(f"unknown model preset {name_or_path!r} (presets: {', '.join(PRESETS)})")
    data = load_spec_file(path)
    unknown = sorted(set(data) - {"model", "train", "preset"}, key=str)
    if unknown:
        raise SpecError(f"model spec: unknown key {unknown[0]!r} (known: model, preset, train)")
    base = data.get("preset", "default")
    if not isinstance(base, str) or base not in PRESETS:
        raise SpecError(f"unknown model preset {base!r} (presets: {', '.join(PRESETS)})")
    for table in ("model", "train"):
        if not isinstance(data.get(table, {}), dict):
            raise SpecError(f"{table}: expected a table, got {data[table]!r}")
    m = from_dict(ModelSpec, {**to_dict(PRESETS[base]), **data.get("model", {})}, "model")
    t = from_dict(TrainSpec, {**to_dict(TRAIN_PRESETS[base]), **data.get("train", {})}, "train")
    return m, t


def with_overrides(spec, **kw):
    """`dataclasses.replace` that drops None values and validates the result (types, ranges, `validate()`)."""
    out = replace(spec, **{k: v for k, v in kw.items() if v is not None})
    return validate_spec(out, "train" if isinstance(spec, TrainSpec) else "model")
