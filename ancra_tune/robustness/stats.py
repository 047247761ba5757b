"""How sure a number is: per-example outcomes as the unit, intervals, paired tests, power.

Every accuracy the platform publishes comes from a matrix of outcomes, one row per seed (an
independently trained model) and one column per evaluated example (the same examples for every
seed and every row of a table), ``True`` where the example survived. From it:

- :func:`proportion_ci`: k/n and its 95% interval (Wilson, or the exact Clopper-Pearson), from
  ``scipy.stats.binomtest``;
- :func:`estimate`: the mean over seeds and examples with an interval that accounts for both
  sources (a two-way bootstrap: seeds and examples resampled independently), never narrower than
  the binomial interval on the pooled examples;
- :func:`compare`: one row against a baseline on the same examples and seeds: the difference, its
  95% interval (the same two-way bootstrap, paired) and an exact McNemar test stratified by seed
  (the discordant pairs of every seed pooled: under "no difference" each is equally likely to go
  either way, so their split is Binomial(discordant, 1/2): ``scipy.stats.binomtest``);
- :func:`holm`: the p-values of one page corrected for their number (Holm's step-down);
- :func:`mde` / :func:`examples_needed`: the smallest difference a design resolves (two-sided 5%,
  80% power) and the examples per seed a target difference needs.

Outcomes travel compactly (:func:`pack`: a bitfield in base64, 200 examples in 36 characters).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.8
BOOTSTRAP = 2000
PACKING = "packbits-base64"  # how report.json stores outcomes (see pack)


# --------------------------------------------------------------------------- storage


def pack(bits: Sequence[bool] | np.ndarray) -> str:
    """Outcomes as a bitfield (``numpy.packbits``, big-endian bit order) in base64."""
    return base64.b64encode(np.packbits(np.asarray(bits, dtype=bool)).tobytes()).decode("ascii")


def unpack(text: str, n: int) -> np.ndarray:
    """The ``n`` outcomes :func:`pack` stored."""
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    bits = np.unpackbits(raw)[:n].astype(bool)
    if bits.size != n:
        raise ValueError(f"packed outcomes hold {bits.size} examples, expected {n}")
    return bits


# --------------------------------------------------------------------------- one number


def proportion_ci(k: int, n: int, method: str = "wilson", level: float = 1 - ALPHA) -> tuple[float, float]:
    """The 95% interval of k successes in n (``method``: wilson or exact)."""
    if n <= 0:
        return (math.nan, math.nan)
    ci = sps.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method=method)
    return (float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Estimate:
    """An accuracy over seeds and examples: its mean, spread and 95% interval."""

    mean: float
    std: float | None  # over seeds (None with one seed)
    n: int  # examples per seed
    seeds: int
    per_seed: tuple[float, ...]
    ci95: tuple[float, float]
    paired_data: bool = True  # False: built from counts alone (no per-example outcomes kept)

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "seeds": self.seeds,
                "per_seed": list(self.per_seed), "ci95": list(self.ci95)}


def _matrix(outcomes: Sequence[Sequence[bool]] | np.ndarray) -> np.ndarray:
    x = np.asarray(outcomes, dtype=bool)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"outcomes must be seeds x examples with at least one of each, got shape {x.shape}")
    return x


def _two_way_means(x: np.ndarray, rng: np.random.Generator, reps: int) -> np.ndarray:
    """Bootstrap means of a seeds x examples matrix (outcomes, or paired differences), seeds and
    examples resampled independently."""
    s, n = x.shape
    ex = rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)  # reps x n example weights
    per_seed = ex @ x.T.astype(np.float64) / n  # reps x s: each seed's mean on the resampled examples
    sw = rng.multinomial(s, np.full(s, 1.0 / s), size=reps).astype(np.float64)  # reps x s seed weights
    return (sw * per_seed).sum(1) / s


def estimate(outcomes: Sequence[Sequence[bool]] | np.ndarray, *, seed: int = 0) -> Estimate:
    """Mean accuracy of a seeds x examples outcome matrix with a 95% interval over both sources:
    the two-way bootstrap's percentile interval, widened to the Wilson interval of the pooled
    examples where that is wider (a bootstrap over few seeds can be too narrow)."""
    x = _matrix(outcomes)
    s, n = x.shape
    per_seed = tuple(float(v) for v in x.mean(1))
    boot = _two_way_means(x, np.random.default_rng(seed), BOOTSTRAP)
    lo, hi = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    wlo, whi = proportion_ci(int(x.sum()), x.size)
    return Estimate(mean=float(x.mean()), std=float(np.std(per_seed, ddof=1)) if s > 1 else None, n=n, seeds=s,
                    per_seed=per_seed, ci95=(min(float(lo), wlo), max(float(hi), whi)))


def _count_means(k: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means from per-seed counts ``k`` of ``n``: seeds resampled, each count redrawn from its
    binomial."""
    pick = rng.integers(0, k.size, size=(BOOTSTRAP, k.size))
    return rng.binomial(n, (k / n)[pick]).sum(1) / (k.size * n)


def estimate_from_counts(correct: Sequence[int], n: int, *, seed: int = 0) -> Estimate:
    """The same, where only each seed's count survived (results published before outcomes were kept):
    seeds resampled, and each seed's count redrawn from its binomial (examples independent)."""
    k = np.asarray(correct, dtype=np.int64)
    s = k.size
    if s < 1 or n < 1:
        raise ValueError("need at least one seed and one example")
    boot = _count_means(k, n, np.random.default_rng(seed))
    lo, hi = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    wlo, whi = proportion_ci(int(k.sum()), s * n)
    per_seed = tuple(float(v) for v in k / n)
    return Estimate(mean=float(k.sum() / (s * n)), std=float(np.std(per_seed, ddof=1)) if s > 1 else None, n=n,
                    seeds=s, per_seed=per_seed, ci95=(min(float(lo), wlo), max(float(hi), whi)), paired_data=False)


# --------------------------------------------------------------------------- two rows


@dataclass(frozen=True)
class Comparison:
    """A row against its baseline on one metric: ``diff`` = row - baseline (fractions)."""

    diff: float
    ci95: tuple[float, float]
    p: float
    test: str
    discordant: tuple[int, int] | None = None  # (row right, baseline wrong), (baseline right, row wrong)
    p_holm: float | None = None
    extra: dict[str, object] = field(default_factory=dict)


def compare(row: np.ndarray, baseline: np.ndarray, *, seed: int = 0) -> Comparison:
    """Paired comparison of two seeds x examples outcome matrices (seed i of one paired with seed i of
    the other, on the same examples): exact McNemar stratified by seed, and the two-way bootstrap
    interval of the difference."""
    a, b = _matrix(baseline), _matrix(row)
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same seeds x examples, got {b.shape} and {a.shape}")
    up = int((b & ~a).sum())
    down = int((a & ~b).sum())
    p = float(sps.binomtest(up, up + down, 0.5).pvalue) if up + down else 1.0
    d = b.astype(np.int8) - a.astype(np.int8)
    boot = _two_way_means(d, np.random.default_rng(seed), BOOTSTRAP)
    lo, hi = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    return Comparison(diff=float(d.mean()), ci95=(float(lo), float(hi)), p=p,
                      test="exact McNemar, stratified by seed", discordant=(up, down))


def compare_counts(row: Sequence[int], baseline: Sequence[int], n: int, *, seed: int = 0) -> Comparison:
    """Unpaired comparison from counts alone (no per-example outcomes kept): Fisher's exact test on the
    pooled counts, and a parametric bootstrap interval of the difference."""
    kb, ka = np.asarray(row), np.asarray(baseline)
    nb, na = kb.size * n, ka.size * n
    p = float(sps.fisher_exact([[kb.sum(), nb - kb.sum()], [ka.sum(), na - ka.sum()]]).pvalue)
    rng = np.random.default_rng(seed)
    boot = _count_means(kb, n, rng) - _count_means(ka, n, rng)
    lo, hi = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    return Comparison(diff=float(kb.sum() / nb - ka.sum() / na), ci95=(float(lo), float(hi)), p=p,
                      test="Fisher's exact test on pooled counts (unpaired: no per-example outcomes kept)")


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of the p-values of one page (family-wise error at 5%).
    scipy.stats has Benjamini-Hochberg (false_discovery_control) but not Holm."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(c: Comparison, *, level: float = ALPHA, what: str = "") -> str:
    """What a page may say of a comparison: higher or lower only where the (corrected) test supports
    it, and where the interval over seeds and examples still holds 0 (the seeds disagree), that the
    difference is one of these seeds' models; otherwise that no difference is resolvable at this
    size, with the interval's half-width."""
    p = c.p_holm if c.p_holm is not None else c.p
    if p < level:
        word = "higher" if c.diff > 0 else "lower"
        said = f"{word}{' ' + what if what else ''} by {100 * abs(c.diff):.1f} points (p = {p:.2g})"
        lo, hi = c.ci95
        if lo <= 0 <= hi:  # the test pools the seeds' examples; the interval resamples the seeds too
            said += (f" on these seeds' models, not across seeds: the interval over seeds and examples, "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}], holds 0")
        return said
    half = max(abs(c.ci95[0] - c.diff), abs(c.ci95[1] - c.diff))
    return f"no difference resolvable at this size (±{100 * half:.1f} points, p = {p:.2g})"


# --------------------------------------------------------------------------- power


def _z() -> float:
    return float(sps.norm.ppf(1 - ALPHA / 2) + sps.norm.ppf(POWER))


def mde(p: float, n: int, seeds: int, *, seed_sd: float = 0.0) -> float:
    """The smallest difference between two rows (accuracy near ``p``, ``n`` examples per seed,
    ``seeds`` seeds each) a two-sided 5% test detects with 80% power: two independent rows, the
    examples' binomial variance plus the seeds' own (``seed_sd``, the std of one seed's accuracy
    beyond sampling). A paired test on shared examples does at least as well."""
    if n < 1 or seeds < 1:
        return math.inf
    p = min(max(p, 1e-3), 1 - 1e-3)
    var = 2 * (p * (1 - p) / (n * seeds) + seed_sd ** 2 / seeds)
    return _z() * math.sqrt(var)


def examples_needed(d: float, p: float, seeds: int, *, seed_sd: float = 0.0) -> int | None:
    """Examples per seed for :func:`mde` to reach ``d`` with ``seeds`` seeds; None when no number of
    examples can (the seeds' own spread alone is too large: more seeds are needed)."""
    p = min(max(p, 1e-3), 1 - 1e-3)
    room = (d / _z()) ** 2 / 2 - seed_sd ** 2 / seeds
    if room <= 0:
        return None
    return int(math.ceil(p * (1 - p) / (seeds * room)))


def seed_spread(per_seed: Sequence[float], n: int) -> float:
    """The seeds' own spread of accuracy, beyond what ``n`` examples' sampling explains (0 when the
    observed spread is within it, or with one seed)."""
    if len(per_seed) < 2:
        return 0.0
    p = float(np.mean(per_seed))
    excess = float(np.var(per_seed, ddof=1)) - p * (1 - p) / n
    return math.sqrt(excess) if excess > 0 else 0.0
