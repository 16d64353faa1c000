"""`TraceResult` (arrays + labels, saved as JSON + npz), token-category summaries and `locate`.

Token categories follow ROME's averaged figures (Meng et al. 2022, Fig. 2): first subject token,
middle subject tokens (mean over them), last subject token, first subsequent token, further
tokens (mean over them) and the last token. Tokens before the subject (<bos>, template words)
belong to no category, as in ROME. A single-token subject is both first and last subject token.
Means over facts come with 95% intervals 1.96 sd / sqrt(n) (sd with ddof=1; 0 when n = 1).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mechedit.errors import MecheditError
from mechedit.fileio import read_json, write_json_atomic

CATEGORIES = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
CATEGORY_LABELS = {
    "first_subject": "first subject token", "middle_subject": "middle subject tokens",
    "last_subject": "last subject token", "first_subsequent": "first subsequent token",
    "further": "further tokens", "last": "last token",
}
RESULT_FORMAT = 1


@dataclass(frozen=True)
class Location:
    """Where a fact is stored according to a trace: mean indirect effect of `site` at `layer`.

    `ci95` is the 95% half-interval of that mean over the `n` traced facts: the noise floor. A
    location whose interval includes 0 (`score - ci95 <= 0`; with one fact, `score <= 0`) is not a
    location (`above_noise` False): reports and the CLI say "none" there.
    """

    site: str
    layer: int
    score: float
    token_category: str
    ci95: float = 0.0
    n: int = 0

    @property
    def above_noise(self) -> bool:
        return self.score - self.ci95 > 0


def category_positions(n_tokens: int, subject: tuple[int, int]) -> dict[str, list[int]]:
    """Token positions of each category for a prompt of `n_tokens` with subject tokens [a, b)."""
    a, b = subject
    last = n_tokens - 1
    return {
        "first_subject": [a],
        "middle_subject": list(range(a + 1, b - 1)),
        "last_subject": [b - 1],
        "first_subsequent": [b] if b < last else [],
        "further": list(range(b + 1, last)),
        "last": [last],
    }


def mean_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, 95% half-interval 1.96 sd/sqrt(n) and n over axis 0, ignoring NaN."""
    values = np.asarray(values, dtype=float)
    n = np.sum(~np.isnan(values), axis=0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        sd = np.where(n > 1, np.nanstd(values, axis=0, ddof=1), 0.0)
    ci = np.where(n > 0, 1.96 * sd / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, ci, n


@dataclass
class TraceResult:
    """Causal traces of several facts.

    `p_restored[kind]` is [fact, layer, token] (sample mean; NaN past a fact's last token), kinds
    are "resid", "mlp", "attn" and the severed "resid_sever_mlp" / "resid_sever_attn".
    `facts[i]` labels row i (fact index, subject, relation, object, prompt, tokens, subject span).
    """

    config: dict
    noise_scale: float
    n_layers: int
    facts: list[dict]
    p_clean: np.ndarray  # [F]
    p_corrupt: np.ndarray  # [F] sample mean
    p_corrupt_samples: np.ndarray  # [F, S]
    p_restored: dict[str, np.ndarray]  # kind -> [F, L, T]
    skipped: list[dict] = field(default_factory=list)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.p_restored)

    @property
    def n_facts(self) -> int:
        return len(self.facts)

    def indirect_effect(self, kind: str) -> np.ndarray:
        """IE = p_restored - p_corrupt: [F, L, T]."""
        if kind not in self.p_restored:
            raise MecheditError(f"site {kind!r} was not traced (traced: {', '.join(self.kinds)})")
        return self.p_restored[kind] - self.p_corrupt[:, None, None]

    @property
    def total_effect(self) -> np.ndarray:
        """TE = p_clean - p_corrupt: [F]."""
        return self.p_clean - self.p_corrupt

    def rows(self, fact: str | int | None = None, relation: str | None = None) -> np.ndarray:
        """Row indices of the facts selected by fact ("SUBJECT|RELATION" or Fact.index) or relation."""
        idx = np.arange(self.n_facts)
        if relation is not None:
            idx = np.array([i for i in idx if self.facts[i]["relation"] == relation], dtype=int)
            if not len(idx):
                raise MecheditError(f"relation {relation!r} has no traced facts in this result")
        if fact is not None:
            def match(d):
                if isinstance(fact, (int, np.integer)):
                    return d["index"] == fact
                return f"{d['subject']}|{d['relation']}" == str(fact).replace(" | ", "|")
            idx = np.array([i for i in idx if match(self.facts[i])], dtype=int)
            if not len(idx):
                raise MecheditError(f"fact {fact!r} is not in this trace result")
        return idx

    def category_effects(self, kind: str) -> np.ndarray:
        """IE averaged within each token category: [F, len(CATEGORIES), L] (NaN where absent)."""
        ie = self.indirect_effect(kind)
        out = np.full((self.n_facts, len(CATEGORIES), self.n_layers), np.nan)
        for i, d in enumerate(self.facts):
            for c, pos in enumerate(category_positions(len(d["tokens"]), tuple(d["subject_span"])).values()):
                if pos:
                    out[i, c] = ie[i][:, pos].mean(axis=1)
        return out

    def summary(self) -> dict:
        """Mean IE (with 95% CI and n) per kind, category and layer, overall and per relation; mean TE."""
        def block(rows):
            d = {}
            for k in self.kinds:
                ce = self.category_effects(k)[rows]
                d[k] = {}
                for c, name in enumerate(CATEGORIES):
                    m, ci, n = mean_ci(ce[:, c])
                    d[k][name] = {"mean": _list(m), "ci95": _list(ci), "n": n.tolist()}
            m, ci, n = mean_ci(self.total_effect[rows])
            d["total_effect"] = {"mean": _num(m), "ci95": _num(ci), "n": int(n)}
            m, _, _ = mean_ci(self.p_clean[rows])
            d["p_clean"] = _num(m)
            m, _, _ = mean_ci(self.p_corrupt[rows])
            d["p_corrupt"] = _num(m)
            return d

        rels = sorted({d["relation"] for d in self.facts})
        return {"n_facts": self.n_facts, "n_skipped": len(self.skipped), "noise_scale": self.noise_scale,
                "overall": block(np.arange(self.n_facts)) if self.n_facts else {},
                "by_relation": {r: block(self.rows(relation=r)) for r in rels}}

    # ---- I/O ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write trace.json (config, labels, skipped) and trace.npz (arrays) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "p_corrupt_samples": self.p_corrupt_samples}
        arrays.update({f"p_restored__{k}": v for k, v in self.p_restored.items()})
        np.savez_compressed(directory / "trace.npz", **arrays)
        write_json_atomic(directory / "trace.json", {
            "format": RESULT_FORMAT, "config": self.config, "noise_scale": self.noise_scale,
            "n_layers": self.n_layers, "kinds": list(self.kinds), "facts": self.facts, "skipped": self.skipped})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "TraceResult":
        directory = Path(directory)
        meta = read_json(directory / "trace.json", "trace.json")
        if meta.get("format") != RESULT_FORMAT:
            raise MecheditError(f"unsupported trace format {meta.get('format')!r} in {directory}")
        try:
            with np.load(directory / "trace.npz") as z:
                arrays = {k: z[k] for k in z.files}
            return cls(meta["config"], float(meta["noise_scale"]), int(meta["n_layers"]), meta["facts"],
                       arrays["p_clean"], arrays["p_corrupt"], arrays["p_corrupt_samples"],
                       {k: arrays[f"p_restored__{k}"] for k in meta["kinds"]}, meta.get("skipped", []))
        except (OSError, KeyError, ValueError) as exc:
            raise MecheditError(f"corrupt trace result in {directory}: {exc}") from None


def _list(a: np.ndarray) -> list:
    return [None if np.isnan(x) else float(x) for x in np.asarray(a, dtype=float)]


def _num(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def rank_locations(result: TraceResult, site: str = "mlp", *, token_category: str = "last_subject",
                   fact: str | int | None = None, relation: str | None = None) -> list[Location]:
    """(site, layer) locations ranked by mean IE at `token_category`, best first.

    Over one fact, one relation's facts or (default) all facts of the result. Layers whose mean is
    undefined (no fact has a token of that category) are left out.
    """
    if token_category not in CATEGORIES:
        raise MecheditError(f"unknown token category {token_category!r} (known: {', '.join(CATEGORIES)})")
    if result.n_facts == 0:
        raise MecheditError("the trace result has no traced facts (all were skipped?)")
    rows = result.rows(fact=fact, relation=relation)
    ce = result.category_effects(site)[rows, CATEGORIES.index(token_category)]  # [n, L]
    mean, ci, n = mean_ci(ce)
    locs = [Location(site, int(l), float(mean[l]), token_category, float(ci[l]), int(n[l]))
            for l in range(result.n_layers) if n[l] > 0]
    if not locs:
        raise MecheditError(f"no traced fact has a {CATEGORY_LABELS[token_category]}")
    return sorted(locs, key=lambda x: (-x.score, x.layer))


def locate(result: TraceResult, site: str = "mlp", *, token_category: str = "last_subject",
           fact: str | int | None = None, relation: str | None = None) -> Location:
    """The best location: argmax over layers of the mean IE of `site` at `token_category`."""
    return rank_locations(result, site, token_category=token_category, fact=fact, relation=relation)[0]
