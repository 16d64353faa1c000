"""Library entry points behind `mechedit world`, `mechedit train` and `mechedit info`."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from mechedit import progress as P
from mechedit.errors import SpecError
from mechedit.fileio import check_output_dir, output_dir
from mechedit.model.checkpoint import HASH_KEY, VERIFIED_KEY, Bundle, load_checkpoint, save_checkpoint
from mechedit.model.evaluate import evaluate_inference, evaluate_recall
from mechedit.model.spec import ModelSpec, TrainSpec
from mechedit.model.train import state_key, train_model, training_key
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
                     meta_extra: dict | Callable[[], dict] | None = None,
                     stop_at: Callable[[int], bool] | None = None,
                     on_epoch: Callable[[int, bool], None] | None = None) -> Bundle:
    """Train on `world`, evaluate every probe set, and write a checkpoint directory atomically.

    With `exclude_facts` (a retrained reference) "trained" recall covers the remaining facts and
    "excluded" the left-out ones; `stop_epoch`, `stop_at` and `on_epoch` go to `train_model`, `meta_extra`
    (or what it returns, asked once the training has ended) to mechedit.json.
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
        what = f"training ({mspec.name} model, {len(world.train_facts)} facts)"
        with P.step(what):
            res = train_model(world, tokenizer, mspec, tspec, log_path=tmp / "train_log.jsonl", progress=progress,
                              exclude_facts=exclude_facts, stop_epoch=stop_epoch, state_dir=tmp / STATE_DIR,
                              stop_at=stop_at, on_epoch=on_epoch)
            P.status("recall on every probe set")
            final = {"trained": evaluate_recall(res.model, tokenizer, world, exclude_facts=exclude_facts),
                     "heldout_subjects": evaluate_recall(res.model, tokenizer, world, trained=False)}
            if exclude_facts:
                final["excluded"] = evaluate_recall(res.model, tokenizer, world,
                                                    facts=[world.facts[i] for i in sorted(exclude_facts)])
            if world.inference:
                final["inference"] = evaluate_inference(res.model, tokenizer, world)
        extra = meta_extra() if callable(meta_extra) else meta_extra
        meta = {
            "world_spec": world.spec.to_dict(), "model_spec": to_dict(mspec), "train_spec": to_dict(tspec),
            "curve": res.curve, "final_recall": final, "train_seconds": round(res.seconds, 3),
            "epochs": res.epochs, "tokens": res.tokens, "stopped_early": res.stopped_early,
            "device": str(res.model.device),
            "excluded_facts": sorted(exclude_facts), **(extra or {}),
        }
        if world.spec.instructions:  # does the model follow forget instructions about subjects it never saw named?
            from mechedit.world.instructions import evaluate_instructions

            meta["instruction_following"] = evaluate_instructions(res.model, tokenizer, world)
        save_checkpoint(tmp, res.model, tokenizer, world, meta)
        shutil.rmtree(tmp / STATE_DIR, ignore_errors=True)
    return load_checkpoint(out)


NAME_SAMPLE = 8  # names `mechedit info` shows of each kind without --names


def world_names(world: World, all_names: bool = False) -> dict:
    """The world's names a user types: trained subjects (and held-out ones), relations with their
    objects, and facts as "SUBJECT|RELATION -> OBJECT"; the first few of each unless `all_names`."""
    cut = (lambda xs: list(xs)) if all_names else (lambda xs: list(xs)[:NAME_SAMPLE])  # noqa: E731
    main = [s for s in world.subjects if s.kind == "subject"]
    facts = [f"{world.subject_of(f).name}|{f.relation} -> {f.object}" for f in world.train_facts]
    out = {
        "subjects": cut(s.name for s in main if not s.heldout),
        "heldout_subjects": cut(s.name for s in main if s.heldout),
        "relations": {r.name: cut(r.objects) for r in world.relations},
        "facts": cut(facts),
    }
    if not all_names:
        out["note"] = (f"the first {NAME_SAMPLE} of each ({sum(not s.heldout for s in main)} trained subjects, "
                       f"{len(facts)} trained facts); --names lists them all")
    return out


def info(directory: str | Path, all_names: bool = False) -> dict:
    """A checkpoint in brief (model, world, training, recall, names), or a world directory's world and
    names (what `mechedit world` wrote: world.json and no checkpoint)."""
    directory = Path(directory)
    if (directory / "world.json").is_file() and not any((directory / f).exists()
                                                         for f in ("mechedit.json", "config.json", "model.safetensors")):
        w = World.load(directory)
        return {"path": str(directory), "world": w.summary(), "names": world_names(w, all_names)}
    b = load_checkpoint(directory)
    n_params = sum(p.numel() for p in b.model.parameters())
    verified = b.meta.get(VERIFIED_KEY)
    from mechedit.world.identifiability import name_statistics

    names = name_statistics(b.world, b.tokenizer if b.world.spec.tokenizer != "word" else None)
    for unit in names.values():
        unit.pop("mi_by_relation", None)
    return {
        "path": str(directory), "mechedit_version": b.meta.get("mechedit_version"),
        "weights": ({"sha256": b.meta.get(HASH_KEY), "verified": True} if verified else
                    {"sha256": None, "verified": False,
                     "note": "no weights_sha256 in mechedit.json (written before weight hashes): not verified"}),
        "model": b.meta.get("model_spec"), "parameters": n_params, "world": b.world.summary(),
        "names": names,
        "train_seconds": b.meta.get("train_seconds"), "epochs": b.meta.get("epochs"),
        "trained_on": b.meta.get("device", "cpu"),
        "final_recall": b.meta.get("final_recall"), "names": world_names(b.world, all_names),
    }
