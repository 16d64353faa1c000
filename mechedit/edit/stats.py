"""Second-moment statistics C = E[k k^T] of MLP keys (the input of `dense_4h_to_h`) on the world's corpus.

ROME / MEMIT / AlphaEdit use C as the prior over keys the edit must preserve (Meng et al. 2022,
2023; Fang et al. 2025). The reference code estimates C on Wikipedia; here the keys come from the
model's own training corpus (`world.corpus()`), every non-pad token of every sentence. The result
is uncentred, float64, and cached beside the checkpoint (`<checkpoint>/stats/`), or in
`$MECHEDIT_CACHE` / `~/.cache/mechedit/stats/<checkpoint id>` when the checkpoint is read-only,
keyed by layer and sample count and invalidated when the weights file changes.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mechedit.model.evaluate import pad

# wall-clock seconds spent computing (not loading) statistics in this process; benchmarks read it
TIMINGS = {"compute_s": 0.0, "load_s": 0.0}


def w_out_name(layer: int) -> str:
    """HF parameter name of layer `layer`'s MLP down projection (weight [d_model, d_mlp])."""
    return f"gpt_neox.layers.{layer}.mlp.dense_4h_to_h.weight"


@contextlib.contextmanager
def capture_keys(model, layers: list[int]):
    """Record the input of `dense_4h_to_h` (post-activation keys, [batch, pos, d_mlp]) of each layer.

    Yields a dict layer -> list of captured tensors (one per forward); hooks are removed on exit.
    """
    store: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    handles = []
    for l in layers:
        mod = model.gpt_neox.layers[l].mlp.dense_4h_to_h
        handles.append(mod.register_forward_pre_hook(lambda m, inp, l=l: store[l].append(inp[0])))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _cache_dir(bundle) -> Path:
    env = os.environ.get("MECHEDIT_CACHE")
    path = Path(bundle.path) if bundle.path is not None else None
    if path is not None and not env and os.access(path, os.W_OK):
        return path / "stats"
    ident = hashlib.sha1(str(path.resolve() if path else "memory").encode()).hexdigest()[:12]
    return Path(env or Path.home() / ".cache" / "mechedit" / "stats") / ident


def _weights_stamp(bundle) -> str:
    """Identifies the weights the statistics were computed on (file size + mtime of the checkpoint)."""
    if bundle.path is None:
        return "memory"
    f = Path(bundle.path) / "model.safetensors"
    st = f.stat()
    return f"{st.st_size}-{int(st.st_mtime_ns)}"


@torch.no_grad()
def compute_second_moment(model, tokenizer, texts: list[str], layers: list[int],
                          batch_size: int = 256) -> dict[int, torch.Tensor]:
    """C_l = (1/N) sum_t k_t k_t^T over every real token of `texts`, float64 [d_mlp, d_mlp] per layer."""
    ids = [tokenizer(t)["input_ids"] for t in texts]
    sums: dict[int, torch.Tensor] = {}
    count = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(ids), batch_size):
        x, m = pad(ids[start : start + batch_size], tokenizer.pad_token_id, model.device)
        with capture_keys(model, layers) as store:
            model(input_ids=x, attention_mask=m)
        sel = m.bool()
        count += int(sel.sum())
        for l in layers:
            k = store[l][0][sel].double()  # [tokens, d_mlp]
            sums[l] = sums.get(l, 0) + k.T @ k
    if was_training:
        model.train()
    return {l: s / count for l, s in sums.items()}


def corpus_sample(world, n_samples: int | None, seed: int = 0) -> list[str]:
    texts = world.corpus()
    if n_samples is not None and n_samples < len(texts):
        idx = np.random.default_rng(seed).choice(len(texts), size=n_samples, replace=False)
        texts = [texts[int(i)] for i in sorted(idx)]
    return texts


def second_moment(bundle, layer: int, n_samples: int | None = None, *, cache: bool = True) -> torch.Tensor:
    """C = E[k k^T] for `layer` of `bundle.model` on (a seeded sample of) the world's corpus; cached.

    Statistics describe the unedited checkpoint: a cached file is reused only for the same weights
    file. For an in-memory model (`bundle.path is None`) nothing is cached.
    """
    key = f"layer{layer}_n{'all' if n_samples is None else n_samples}"
    cdir = _cache_dir(bundle)
    file = cdir / f"mom2_{key}.safetensors"
    stamp = _weights_stamp(bundle)
    if cache and bundle.path is not None and file.is_file():
        t0 = time.perf_counter()
        try:
            data = load_file(str(file))
            if bytes(data["stamp"].tolist()).decode() == stamp:
                TIMINGS["load_s"] += time.perf_counter() - t0
                return data["C"].to(bundle.model.device)
        except Exception:  # a corrupt cache file is recomputed
            pass
    t0 = time.perf_counter()
    C = compute_second_moment(bundle.model, bundle.tokenizer, corpus_sample(bundle.world, n_samples), [layer])[layer]
    TIMINGS["compute_s"] += time.perf_counter() - t0
    if cache and bundle.path is not None:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            save_file({"C": C.cpu().contiguous(), "stamp": torch.tensor(list(stamp.encode()), dtype=torch.uint8)},
                      str(tmp))
            os.replace(tmp, file)
        except OSError:
            pass  # caching is an optimisation; a read-only location just means recomputing
    return C
