"""Checkpoint directories: save a trained model with its tokenizer and world, load them back.

A checkpoint is an ordinary Hugging Face directory (`config.json`, `model.safetensors`, tokenizer
files) plus `world.json` and `mechedit.json` (version, specs, training curve, final recall,
training seconds). `AutoModelForCausalLM.from_pretrained(dir)` loads it; `load_checkpoint` returns
a `Bundle` with the model, tokenizer and world together. A model saved with adaptors attached (GRACE,
WISE, RepE, ICU edits; `mechedit.edit.adaptors`) also gets `adaptors.safetensors` / `adaptors.json`,
named in mechedit.json (`adaptors`), and `load_checkpoint` attaches them again; the HF loader alone
reads only the weights.
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

from transformers.utils import logging as hf_logging

from mechedit.errors import CheckpointError, MecheditError
from mechedit.fileio import read_json, write_json_atomic
from mechedit.world.world import World

hf_logging.disable_progress_bar()  # no "Loading weights" bars in CLI output

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "world.json", "mechedit.json")


@dataclass
class Bundle:
    """A trained model with its tokenizer and world. The HF model is the master copy."""

    model: GPTNeoXForCausalLM
    tokenizer: PreTrainedTokenizerFast
    world: World
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def bridge(self):
        """A TransformerLens 4.x `TransformerBridge` over a deep copy of the HF model (in eval mode).

        The bridge rewrites the module it wraps, so it never touches `self.model`; rebuild it after
        the HF weights change (an applied edit).
        """
        return make_bridge(self.model)

    def save(self, directory: str | Path, meta_extra: dict | None = None) -> Path:
        return save_checkpoint(directory, self.model, self.tokenizer, self.world, {**self.meta, **(meta_extra or {})})


def make_bridge(model: GPTNeoXForCausalLM):
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("transformer_lens").setLevel(logging.ERROR)
        bridge = build_bridge_from_module(copy.deepcopy(model), "GPTNeoXForCausalLM", hf_config=model.config)
    bridge.eval()
    return bridge


def save_checkpoint(directory: str | Path, model, tokenizer, world: World, meta: dict) -> Path:
    from mechedit import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    world.save(directory)
    meta = {**meta, "mechedit_version": __version__}
    meta.pop("adaptors", None)
    meta.update(_save_attached_adaptors(model, directory))
    write_json_atomic(directory / "mechedit.json", meta)
    return directory


def _save_attached_adaptors(model, directory: Path) -> dict:
    """Write the model's attached adaptors beside the weights; the mechedit.json entry naming them."""
    from mechedit.edit.adaptors import ADAPTORS_JSON, attached, save_adaptors

    adaptors = attached(model)
    if not adaptors:
        return {}
    save_adaptors(adaptors, directory)
    return {"adaptors": {"file": ADAPTORS_JSON, "kinds": sorted({a.kind for a in adaptors}), "n": len(adaptors)}}


def _attach_saved_adaptors(model, directory: Path) -> None:
    from mechedit.edit.adaptors import attach, load_adaptors

    for a in load_adaptors(directory):
        attach(model, a)


def load_checkpoint(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> Bundle:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint not found: {directory}")
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"not a mechedit checkpoint: {directory} is missing {', '.join(missing)}")
    try:
        meta = read_json(directory / "mechedit.json", "mechedit.json")
        world = World.load(directory)
    except CheckpointError:
        raise
    except MecheditError as exc:
        raise CheckpointError(f"corrupt checkpoint {directory}: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GPTNeoXForCausalLM.from_pretrained(directory, dtype=dtype)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    except Exception as exc:  # safetensors/json/HF errors all mean the same to the user
        raise CheckpointError(f"corrupt checkpoint {directory}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    model.eval()
    if len(tokenizer) != model.config.vocab_size:
        raise CheckpointError(f"corrupt checkpoint {directory}: tokenizer has {len(tokenizer)} tokens, "
                              f"model {model.config.vocab_size}")
    if meta.get("adaptors"):
        try:
            _attach_saved_adaptors(model, directory)
        except MecheditError as exc:
            raise CheckpointError(f"corrupt checkpoint {directory}: {exc}") from None
    return Bundle(model, tokenizer, world, meta, directory)
