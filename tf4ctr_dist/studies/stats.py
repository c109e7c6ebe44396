"""Multi-seed statistics: mean +- std over seeds and two-tailed t-tests (paper Table 4).

Pure python + math: a sweep's summary needs no scipy. The Student-t tail comes from the
regularised incomplete beta function, evaluated by its continued fraction (Lentz's method);
tests/unit/test_studies_stats.py checks the p-values against scipy.stats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for a single value
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.6f} +- {self.std:.6f}" if self.n > 1 else f"{self.mean:.6f}"


@dataclass(frozen=True)
class TTest:
    t: float
    df: float
    p: float  # two-tailed; NaN when the test is undefined (fewer than 2 values, zero variance)
    kind: str  # "paired" (same seeds on both sides) or "welch"


def summarize(values: Iterable[float]) -> Summary:
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Summary(float("nan"), float("nan"), 0)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, n)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast for x < (a+1)/(a+b+2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) beyond.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_tailed_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def welch_ttest(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Two-sample t-test without assuming equal variances (scipy's ttest_ind(equal_var=False))."""
    sa, sb = summarize(a), summarize(b)
    if sa.n < 2 or sb.n < 2:
        return TTest(float("nan"), float("nan"), float("nan"), "welch")
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0.0:
        return TTest(float("nan"), float("nan"), float("nan"), "welch")
    t = (sa.mean - sb.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    return TTest(t, df, t_two_tailed_p(t, df), "welch")


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Paired t-test on a[i] - b[i] (scipy's ttest_rel)."""
    if len(a) != len(b):
        raise ValueError(f"a paired t-test needs equal lengths, got {len(a)} and {len(b)}")
    d = summarize(float(x) - float(y) for x, y in zip(a, b))
    if d.n < 2 or d.std == 0.0:
        return TTest(float("nan"), float("nan"), float("nan"), "paired")
    t = d.mean / (d.std / math.sqrt(d.n))
    df = d.n - 1
    return TTest(t, float(df), t_two_tailed_p(t, df), "paired")


def compare(a: Mapping[int, float], b: Mapping[int, float]) -> TTest:
    """Test ``a`` against ``b``, each {seed: metric}: paired when both ran exactly the same seeds
    (a seed fixes the data order and the initial weights, so runs pair up), Welch otherwise."""
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a)
        return paired_ttest([a[s] for s in seeds], [b[s] for s in seeds])
    return welch_ttest(list(a.values()), list(b.values()))


def seed_table(rows: Iterable[Mapping], metrics: Sequence[str], baseline: Optional[str] = None,
               group_key: str = "config", seed_key: str = "seed") -> list[dict]:
    """Per-configuration mean +- std over seeds, and p-values against ``baseline``.

    rows: one mapping per finished run with ``group_key`` (the configuration's name), ``seed_key``
    and the metric values. Returns one dict per configuration in first-seen order:
    {config, n, seeds, METRIC_mean, METRIC_std, METRIC_p, METRIC_test} (p and test only with a
    baseline; the baseline's own p is NaN).
    """
    groups: dict[str, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault(str(r[group_key]), {})[int(r[seed_key])] = dict(r)
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not among the configurations: {', '.join(groups)}")
    out = []
    for name, by_seed in groups.items():
        row: dict = {"config": name, "n": len(by_seed), "seeds": sorted(by_seed)}
        for m in metrics:
            vals = {s: float(r[m]) for s, r in by_seed.items() if r.get(m) is not None}
            s = summarize(vals.values())
            row[f"{m}_mean"], row[f"{m}_std"] = s.mean, s.std
            if baseline is not None:
                base = {s_: float(r[m]) for s_, r in groups[baseline].items() if r.get(m) is not None}
                test = compare(vals, base) if name != baseline else TTest(float("nan"), float("nan"), float("nan"), "-")
                row[f"{m}_p"], row[f"{m}_test"] = test.p, test.kind
        out.append(row)
    return out


def markdown_table(table: Sequence[Mapping], metrics: Sequence[str], baseline: Optional[str] = None) -> str:
    """The seed table as markdown: mean +- std per metric, and the p-value against the baseline."""
    head = ["config", "runs"]
    for m in metrics:
        head.append(f"{m} (mean +- std)")
        if baseline is not None:
            head.append(f"p vs {baseline}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [str(r["config"]), str(r["n"])]
        for m in metrics:
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            cells.append(f"{mean:.6f} +- {std:.6f}" if r["n"] > 1 else f"{mean:.6f}")
            if baseline is not None:
                p = r[f"{m}_p"]
                cells.append("baseline" if r["config"] == baseline else
                             ("n/a" if math.isnan(p) else f"{p:.3g} ({r[f'{m}_test']})"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
