"""Library entry points behind `mechedit world`, `mechedit train` and `mechedit info`."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from mechedit.errors import SpecError
from mechedit.fileio import check_output_dir, output_dir
from mechedit.model.checkpoint import HASH_KEY, VERIFIED_KEY, Bundle, load_checkpoint, save_checkpoint
from mechedit.model.evaluate import evaluate_recall
from mechedit.model.spec import ModelSpec, TrainSpec
from mechedit.model.train import state_key, train_model, training_key
from mechedit.world import World, WorldSpec, default_world_spec, generate_world
from mechedit.world.tokenizer import build_tokenizer


def resolve_world(source: str | Path | None) -> World:
    """A world from a directory (or world.json), a spec file (TOML/JSON), or the embedded default."""
    if source is None:
        return generate_world(default_world_spec())
    p = Path(source)
    if p.is_dir() or p.name == "world.json":
        return World.load(p)
    if p.suffix.lower() in (".toml", ".json"):
        return generate_world(WorldSpec.from_file(p))
    if not p.exists():
        raise SpecError(f"world source not found: {source}")
    raise SpecError(f"world source {source!r} is neither a world directory nor a .toml/.json spec")


def write_world(world: World, out: str | Path, force: bool = False) -> Path:
    with output_dir(out, force) as tmp:
        world.save(tmp)
        build_tokenizer(world).save_pretrained(tmp)
    return Path(out)


STATE_DIR = "train_state"


def train_checkpoint(world: World, mspec: ModelSpec, tspec: TrainSpec, out: str | Path, *, force: bool = False,
                     progress: Callable[[dict], None] | None = None,
                     exclude_facts: set[int] = frozenset(), stop_epoch: int | None = None,
                     meta_extra: dict | None = None) -> Bundle:
    """Train on `world`, evaluate every probe set, and write a checkpoint directory atomically.

    With `exclude_facts` (a retrained reference) "trained" recall covers the remaining facts and
    "excluded" the left-out ones; `stop_epoch` and `meta_extra` go to `train_model` / mechedit.json.
    The training state is kept in the partial output folder (`train_state/`, removed at the end), so
    a killed or interrupted (Ctrl-C) training of the same output, world and specs resumes where its
    last state was written; a partial of other specs is discarded.
    """
    check_output_dir(out, force)
    tokenizer = build_tokenizer(world)
    mspec.check_size(len(tokenizer))
    key = training_key(world, tokenizer, mspec, tspec, exclude_facts, stop_epoch)
    with output_dir(out, force, adopt=lambda p: state_key(p / STATE_DIR) == key,
                    keep_on=(KeyboardInterrupt,)) as tmp:
        res = train_model(world, tokenizer, mspec, tspec, log_path=tmp / "train_log.jsonl", progress=progress,
                          exclude_facts=exclude_facts, stop_epoch=stop_epoch, state_dir=tmp / STATE_DIR)
        final = {"trained": evaluate_recall(res.model, tokenizer, world, exclude_facts=exclude_facts),
                 "heldout_subjects": evaluate_recall(res.model, tokenizer, world, trained=False)}
        if exclude_facts:
            final["excluded"] = evaluate_recall(res.model, tokenizer, world,
                                                facts=[world.facts[i] for i in sorted(exclude_facts)])
        meta = {
            "world_spec": world.spec.to_dict(), "model_spec": mspec.__dict__, "train_spec": tspec.__dict__,
            "curve": res.curve, "final_recall": final, "train_seconds": round(res.seconds, 3),
            "epochs": res.epochs, "tokens": res.tokens, "stopped_early": res.stopped_early,
            "device": str(res.model.device),
            "excluded_facts": sorted(exclude_facts), **(meta_extra or {}),
        }
        if world.spec.instructions:  # does the model follow forget instructions about subjects it never saw named?
            from mechedit.world.instructions import evaluate_instructions

            meta["instruction_following"] = evaluate_instructions(res.model, tokenizer, world)
        save_checkpoint(tmp, res.model, tokenizer, world, meta)
        shutil.rmtree(tmp / STATE_DIR, ignore_errors=True)
    return load_checkpoint(out)


def info(directory: str | Path) -> dict:
    b = load_checkpoint(directory)
    n_params = sum(p.numel() for p in b.model.parameters())
    verified = b.meta.get(VERIFIED_KEY)
    return {
        "path": str(directory), "mechedit_version": b.meta.get("mechedit_version"),
        "weights": ({"sha256": b.meta.get(HASH_KEY), "verified": True} if verified else
                    {"sha256": None, "verified": False,
                     "note": "no weights_sha256 in mechedit.json (written before weight hashes): not verified"}),
        "model": b.meta.get("model_spec"), "parameters": n_params, "world": b.world.summary(),
        "train_seconds": b.meta.get("train_seconds"), "epochs": b.meta.get("epochs"),
        "trained_on": b.meta.get("device", "cpu"),
        "final_recall": b.meta.get("final_recall"),
    }
