"""Checkpoint directories: save a trained model with its tokenizer and world, load them back.

A checkpoint is an ordinary Hugging Face directory (`config.json`, `model.safetensors`, tokenizer
files) plus `world.json` and `mechedit.json` (version, specs, training curve, final recall,
training seconds, and `weights_sha256`: the SHA-256 of `model.safetensors`).
`AutoModelForCausalLM.from_pretrained(dir)` loads it; `load_checkpoint` returns a `Bundle` with the
model, tokenizer and world together, after checking `mechedit.json` has its required keys and the
weights match their hash (a flipped byte is a `CheckpointError`). Checkpoints written before the
hash existed still load: their weights are not verified, which `Bundle.meta["weights_verified"]`
(False) and `mechedit info` say.
A model saved with adaptors attached (GRACE, WISE, RepE, ICU edits; `mechedit.edit.adaptors`) also
gets `adaptors.safetensors` / `adaptors.json`, named in mechedit.json (`adaptors`), and
`load_checkpoint` attaches them again; the HF loader alone reads only the weights.
"""
from __future__ import annotations

import copy
import hashlib
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
REQUIRED_META = ("mechedit_version", "model_spec", "train_spec", "world_spec")
HASH_KEY = "weights_sha256"
VERIFIED_KEY = "weights_verified"  # set on load (never saved): whether the weights were checked against the hash


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    meta = {k: v for k, v in meta.items() if k not in (VERIFIED_KEY, "adaptors")}
    meta.update(_save_attached_adaptors(model, directory))
    write_json_atomic(directory / "mechedit.json", {**meta, "mechedit_version": __version__,
                                                    HASH_KEY: file_sha256(directory / "model.safetensors")})
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


def check_config(config) -> None:
    """Refuse a config.json that is not a GPT-NeoX model of a size this machine can hold, before HF
    builds the model from it (an empty config would give GPT-NeoX-20B's defaults: 20B parameters)."""
    from mechedit.model.spec import ModelSpec
    from mechedit.specio import validate_spec

    if not isinstance(config, dict):
        raise MecheditError("config.json is not a JSON object")
    if config.get("model_type") != "gpt_neox":
        raise MecheditError(f"config.json describes a {config.get('model_type')!r} model, not gpt_neox")
    keys = {"n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
            "d_mlp": "intermediate_size", "max_len": "max_position_embeddings"}
    missing = [v for v in keys.values() if v not in config] + [k for k in ("vocab_size",) if k not in config]
    if missing:
        raise MecheditError(f"config.json lacks {', '.join(missing)}")
    vocab = config["vocab_size"]
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise MecheditError(f"config.json: bad vocab_size {vocab!r}")
    try:
        validate_spec(ModelSpec(**{k: config[v] for k, v in keys.items()}), "config").check_size(vocab)
    except MecheditError as exc:
        raise MecheditError(f"config.json: {exc}") from None


def load_checkpoint(directory: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Bundle:
    """Load and verify a checkpoint directory; the model goes to `device` (default: the process's
    device, `mechedit.device.current_device`: the CPU unless CUDA is present or `--device` says)."""
    from mechedit.device import current_device, resolve_device

    dev = current_device() if device is None else resolve_device(device)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint not found: {directory}")
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"not a mechedit checkpoint: {directory} is missing {', '.join(missing)}")
    try:
        meta = read_json(directory / "mechedit.json", "mechedit.json")
        if not isinstance(meta, dict):
            raise MecheditError("mechedit.json is not a JSON object")
        absent = [k for k in REQUIRED_META if k not in meta]
        if absent:
            raise MecheditError(f"mechedit.json lacks {', '.join(absent)}")
        recorded = meta.get(HASH_KEY)
        if recorded is not None and recorded != file_sha256(directory / "model.safetensors"):
            raise MecheditError(f"model.safetensors does not match the {HASH_KEY} recorded in mechedit.json "
                                f"(the weights changed after saving)")
        meta[VERIFIED_KEY] = recorded is not None
        check_config(read_json(directory / "config.json", "config.json"))
        world = World.load(directory)
    except (MecheditError, OSError) as exc:
        raise CheckpointError(f"corrupt checkpoint {directory}: {exc}") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # HF prints a load report of mismatched shapes; the error says it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GPTNeoXForCausalLM.from_pretrained(directory, dtype=dtype)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    except Exception as exc:  # safetensors/json/HF errors all mean the same to the user
        raise CheckpointError(f"corrupt checkpoint {directory}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(dev).eval()
    if len(tokenizer) != model.config.vocab_size:
        raise CheckpointError(f"corrupt checkpoint {directory}: tokenizer has {len(tokenizer)} tokens, "
                              f"model {model.config.vocab_size}")
    if meta.get("adaptors"):
        try:
            _attach_saved_adaptors(model, directory)
        except MecheditError as exc:
            raise CheckpointError(f"corrupt checkpoint {directory}: {exc}") from None
    return Bundle(model, tokenizer, world, meta, directory)
