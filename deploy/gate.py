"""Latency-regression gate: compare medians of results with the same fingerprint only."""
from __future__ import annotations

from dataclasses import dataclass, field

from .bench import BenchSettings

PASS, REGRESSION, NOT_COMPARABLE = 0, 1, 2
WARN_ABOVE, FAIL_ABOVE = 0.05, 0.10  # fractions by which a median may be slower before a warning / a failure


@dataclass(frozen=True)
class GateRow:
    label: str
    batch: int
    baseline_ms: float
    current_ms: float
    change: float  # current / baseline - 1
    verdict: str  # "ok", "warn", "fail"


@dataclass(frozen=True)
class GateVerdict:
    exit_code: int
    message: str
    rows: tuple[GateRow, ...] = field(default_factory=tuple)

    def table(self) -> str:
        lines = ["| label | batch | baseline median ms | current median ms | change | verdict |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.label} | {r.batch} | {r.baseline_ms:.3f} | {r.current_ms:.3f} | {100 * r.change:+.1f} % | {r.verdict} |" for r in self.rows]
        return "\n".join(lines)


def noisy_results(results: list[dict], max_cov: float) -> list[dict]:
    return [r for r in results if r["cov"] > max_cov]


def compare_results(current: list[dict], baseline: list[dict], warn: float = WARN_ABOVE, fail: float = FAIL_ABOVE,
                    max_cov: float = BenchSettings.max_cov) -> GateVerdict:
    """Pair results by fingerprint id; any current result without a baseline twin, or too noisy to
    judge, makes the comparison not comparable (exit 2); a median slower by more than `fail` fails."""
    by_id = {r["fingerprint_id"]: r for r in baseline}
    missing = [r for r in current if r["fingerprint_id"] not in by_id]
    if missing:
        first = missing[0]
        return GateVerdict(NOT_COMPARABLE, f"not comparable: no baseline with the fingerprint of {first.get('label') or 'result'} at batch {first['batch']} "
                           f"({first['fingerprint_id']}); fingerprints differ (host, GPU, driver, library versions, precision, batch or artifact)")
    noisy = noisy_results(current, max_cov) + noisy_results([by_id[r["fingerprint_id"]] for r in current], max_cov)
    if noisy:
        return GateVerdict(NOT_COMPARABLE, f"not comparable: coefficient of variation {noisy[0]['cov']:.1%} > {max_cov:.0%}; re-measure on a quieter machine")
    rows = []
    for result in current:
        reference = by_id[result["fingerprint_id"]]
        change = result["median_ms"] / reference["median_ms"] - 1.0
        verdict = "fail" if change > fail else "warn" if change > warn else "ok"
        rows.append(GateRow(result.get("label", ""), result["batch"], reference["median_ms"], result["median_ms"], change, verdict))
    failed = [r for r in rows if r.verdict == "fail"]
    if failed:
        return GateVerdict(REGRESSION, f"regression: {len(failed)} result(s) slower than the baseline by more than {fail:.0%}", tuple(rows))
    warned = sum(r.verdict == "warn" for r in rows)
    return GateVerdict(PASS, f"pass ({warned} warning(s) above {warn:.0%})" if warned else "pass", tuple(rows))
