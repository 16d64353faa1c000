"""Library entry points behind `mechedit world`, `mechedit train` and `mechedit info`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mechedit.errors import SpecError
from mechedit.fileio import commit_output_dir, prepare_output_dir
from mechedit.model.checkpoint import Bundle, load_checkpoint, save_checkpoint
from mechedit.model.evaluate import evaluate_inference, evaluate_recall
from mechedit.model.spec import ModelSpec, TrainSpec
from mechedit.model.train import train_model
from mechedit.world import World, WorldSpec, default_world_spec, generate_world
from mechedit.world.tokenizer import build_tokenizer
from mechedit.specio import to_dict


def resolve_world(source: str | Path | None) -> World:
    """A world from a directory (or world.json), a spec file (TOML/JSON), or the embedded default."""
    if source is None:
        return generate_world(default_world_spec())
    p = Path(source)
    if p.is_dir() or p.name == "world.json":
        return World.load(p)
    if p.suffix.lower() in (".toml", ".json"):
        return generate_world(WorldSpec.from_file(p))
    raise SpecError(f"world source {source!r} is neither a world directory nor a .toml/.json spec")


def write_world(world: World, out: str | Path, force: bool = False) -> Path:
    tmp = prepare_output_dir(out, force)
    world.save(tmp)
    build_tokenizer(world).save_pretrained(tmp)
    return commit_output_dir(tmp, out)


def train_checkpoint(world: World, mspec: ModelSpec, tspec: TrainSpec, out: str | Path, *, force: bool = False,
                     progress: Callable[[dict], None] | None = None,
                     exclude_facts: set[int] = frozenset()) -> Bundle:
    """Train on `world`, evaluate every probe set, and write a checkpoint directory atomically."""
    tmp = prepare_output_dir(out, force)
    tokenizer = build_tokenizer(world)
    res = train_model(world, tokenizer, mspec, tspec, log_path=tmp / "train_log.jsonl", progress=progress,
                      exclude_facts=exclude_facts)
    final = {"trained": evaluate_recall(res.model, tokenizer, world),
             "heldout_subjects": evaluate_recall(res.model, tokenizer, world, trained=False)}
    if world.inference:
        final["inference"] = evaluate_inference(res.model, tokenizer, world)
    meta = {
        "world_spec": world.spec.to_dict(), "model_spec": to_dict(mspec), "train_spec": to_dict(tspec),
        "curve": res.curve, "final_recall": final, "train_seconds": round(res.seconds, 3),
        "epochs": res.epochs, "tokens": res.tokens, "stopped_early": res.stopped_early,
        "excluded_facts": sorted(exclude_facts),
    }
    save_checkpoint(tmp, res.model, tokenizer, world, meta)
    commit_output_dir(tmp, out)
    return load_checkpoint(out)


def info(directory: str | Path) -> dict:
    b = load_checkpoint(directory)
    n_params = sum(p.numel() for p in b.model.parameters())
    return {
        "path": str(directory), "mechedit_version": b.meta.get("mechedit_version"),
        "model": b.meta.get("model_spec"), "parameters": n_params, "world": b.world.summary(),
        "train_seconds": b.meta.get("train_seconds"), "epochs": b.meta.get("epochs"),
        "final_recall": b.meta.get("final_recall"),
    }
