"""Latency-regression gates.

Two ways to decide whether a candidate is slower than its baseline:

- **Paired A/B** (`paired_ab`): both artifacts are timed in one process, interleaved inference by
  inference on identical inputs, so that background load and machine drift hit both alike. The
  decision is taken on the ratio of their latencies with a confidence interval. This is
  the gate for shared CI runners.
- **Stored baseline** (`compare_results`): a bench result against one stored earlier. Results are
  matched by what was measured (label, batch, precision, runner and library versions, host), never
  by the artifact's bytes, and a mismatch names the field that differs. It needs a quiet machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from vitslim.core.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_UNDECIDED
from vitslim.core.settings import refuse_non_finite, setting

from .bench import BenchSettings, comparison_key, device_timer
from .errors import DeployError
from .runners import Runner

# The verdicts of every gate are the CLI's exit codes (vitslim.core.errors).
PASS, REGRESSION, UNDECIDED = EXIT_OK, EXIT_CHECK_FAILED, EXIT_UNDECIDED
NOT_COMPARABLE = UNDECIDED  # a stored baseline that cannot be compared leaves the question undecided
WARN_ABOVE, FAIL_ABOVE = 0.05, 0.10  # fractions by which a candidate may be slower before a warning / a failure


# ---------------------------------------------------------------- stored baselines


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
    noisy: str = ""  # "current" or "baseline" when a side was too noisy to compare
    # reference rows (marked reference_row by bench --run) of the current results the baseline does not hold
    skipped: tuple[str, ...] = field(default_factory=tuple)

    def table(self) -> str:
        lines = [
            "| label | batch | baseline median ms | current median ms | change | verdict |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.label} | {r.batch} | {r.baseline_ms:.3f} | {r.current_ms:.3f} | {100 * r.change:+.1f} % | {r.verdict} |"
            for r in self.rows
        ]
        return "\n".join(lines)


def noisy_results(results: list[dict], max_cov: float) -> list[dict]:
    return [r for r in results if r["cov"] > max_cov]


def _what(result: dict) -> str:
    return f"{result.get('label') or 'result'} at batch {result['batch']}"


def first_difference(current: dict, baseline: dict) -> Optional[str]:
    """'FIELD is X here but Y in the baseline' for the first measured field that differs, or None."""
    here, there = comparison_key(current["fingerprint"]), comparison_key(baseline["fingerprint"])
    for name in sorted(set(here) | set(there)):
        if here.get(name) != there.get(name):
            return f"{name} is {here.get(name)!r} here but {there.get(name)!r} in the baseline"
    return None


def _same_point(result: dict, baseline: list[dict]) -> bool:
    """Whether the baseline holds a result of the same label and batch (measured alike or not)."""
    return any(b.get("label", "") == result.get("label", "") and b["batch"] == result["batch"] for b in baseline)


def baseline_twin(result: dict, baseline: list[dict]) -> tuple[Optional[dict], Optional[str]]:
    """The baseline result measured like `result` (same label and batch, no field of the
    comparison key different) and None, or None and one line saying why there is none."""
    same_point = [
        b for b in baseline if b.get("label", "") == result.get("label", "") and b["batch"] == result["batch"]
    ]
    what = f"{result.get('label') or 'result'} at batch {result['batch']}"
    if not same_point:
        known = (
            ", ".join(sorted({f"{b.get('label') or 'result'} at batch {b['batch']}" for b in baseline})) or "nothing"
        )
        return None, f"no baseline for {what} (the baseline has {known})"
    differences = [first_difference(result, candidate) for candidate in same_point]
    if None in differences:
        return same_point[differences.index(None)], None
    return None, f"{what}: {differences[0]}"


def check_thresholds(warn: float, fail: float, max_cov: float) -> None:
    """Gate thresholds are finite fractions: a NaN or infinite one would switch the gate off."""
    for name, value in (("--warn", warn), ("--fail", fail), ("--max-cov", max_cov)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise DeployError(f"{name} {value!r} must be a finite fraction >= 0 (e.g. 0.10 for 10 %)")


def compare_results(
    current: list[dict],
    baseline: list[dict],
    warn: float = WARN_ABOVE,
    fail: float = FAIL_ABOVE,
    max_cov: float = BenchSettings.max_cov,
) -> GateVerdict:
    """Pair each current result with its baseline twin; a result without one, or too noisy to
    judge, is not comparable (exit 2); a median slower by more than `fail` fails (exit 1). The
    reference rows that `bench --run` adds (timm's model, the compact modules: `reference_row`) are judged
    only where the baseline holds them too: an artifact's baseline may have been stored without
    them. One the baseline holds but measured otherwise is not comparable, like any other row."""
    check_thresholds(warn, fail, max_cov)
    if not current:
        raise DeployError("the current results are empty: a gate needs something measured (vitslim bench --json)")
    for result in [*current, *baseline]:  # the API passes results that no file loader has seen
        numbers = (result.get("median_ms"), result.get("cov"))
        if not all(isinstance(n, (int, float)) and math.isfinite(n) for n in numbers) or result["median_ms"] <= 0:
            raise DeployError(
                f"result {result.get('label') or 'result'}: median_ms and cov must be finite, the median > 0"
            )
    pairs, skipped = [], []
    for result in current:
        twin, why = baseline_twin(result, baseline)
        if twin is None and result.get("reference_row") and not _same_point(result, baseline):
            skipped.append(_what(result))  # a reference row the baseline never held: not judged
            continue
        if twin is None:
            return GateVerdict(NOT_COMPARABLE, f"not comparable: {why}")
        pairs.append((result, twin))
    if not pairs:
        return GateVerdict(
            NOT_COMPARABLE,
            "not comparable: the baseline holds none of the current results (only reference rows were measured)",
        )
    unjudged = f"; not judged (no baseline): {', '.join(skipped)}" if skipped else ""
    noisy_baseline = noisy_results([stored for _, stored in pairs], max_cov)
    if noisy_baseline:  # measuring CURRENT again cannot help: the stored side is the noisy one
        return GateVerdict(
            NOT_COMPARABLE,
            f"not comparable: the baseline of {_what(noisy_baseline[0])} is too noisy (coefficient of variation "
            f"{noisy_baseline[0]['cov']:.1%} > {max_cov:.0%}): store a quieter one (gate --accept --force on a quiet machine)",
            noisy="baseline",
        )
    noisy_current = noisy_results([result for result, _ in pairs], max_cov)
    if noisy_current:
        return GateVerdict(
            NOT_COMPARABLE,
            f"not comparable: the current {_what(noisy_current[0])} is too noisy (coefficient of variation "
            f"{noisy_current[0]['cov']:.1%} > {max_cov:.0%}): re-measure on a quieter machine or use the paired gate "
            "(vitslim gate --ab)",
            noisy="current",
        )
    rows = []
    for result, reference in pairs:
        change = result["median_ms"] / reference["median_ms"] - 1.0
        verdict = "fail" if change > fail else "warn" if change > warn else "ok"
        rows.append(
            GateRow(
                result.get("label", ""), result["batch"], reference["median_ms"], result["median_ms"], change, verdict
            )
        )
    failed = [r for r in rows if r.verdict == "fail"]
    if failed:
        return GateVerdict(
            REGRESSION,
            f"regression: {len(failed)} result(s) slower than the baseline by more than {fail:.0%}{unjudged}",
            tuple(rows),
            skipped=tuple(skipped),
        )
    warned = sum(r.verdict == "warn" for r in rows)
    message = (f"pass ({warned} warning(s) above {warn:.0%})" if warned else "pass") + unjudged
    return GateVerdict(PASS, message, tuple(rows), skipped=tuple(skipped))


# ---------------------------------------------------------------- paired A/B


@dataclass(frozen=True)
class ABSettings:
    fail: float = setting(FAIL_ABOVE, "fail when the candidate is slower than the baseline by more than this fraction")
    confidence: float = setting(0.95, "two-sided confidence of the interval on the latency ratio")
    pairs_per_round: int = setting(
        10, "timed inferences of each artifact per round, alternating baseline and candidate"
    )
    min_rounds: int = setting(20, "rounds before the first decision")
    max_seconds: float = setting(45.0, "measure until decided or this long (then: undecided, exit 2)")
    warmup_seconds: float = setting(1.0, "warm-up of each artifact before timing")

    def __post_init__(self) -> None:
        refuse_non_finite(self, DeployError)
        if not 0 < self.fail < 10 or not 0.5 <= self.confidence < 1:
            raise DeployError(
                f"A/B settings: need 0 < --fail < 10 and 0.5 <= --confidence < 1 (got {self.fail}, {self.confidence})"
            )
        if self.pairs_per_round < 1 or self.min_rounds < 6 or self.max_seconds <= 0 or self.warmup_seconds < 0:
            raise DeployError(
                "A/B settings: need --pairs-per-round >= 1, --min-rounds >= 6, --max-seconds > 0, --warmup-seconds >= 0"
            )


def median_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Distribution-free confidence interval of the median of `values` (one per round): the order
    statistics x_(k) and x_(n+1-k) with the largest k for which P(Binomial(n, 1/2) < k) <= (1 -
    confidence) / 2. Exact whatever the distribution; the median, not the mean, because on a
    loaded machine a burst of preemption can hit one side of a whole round and make its ratio 0.3
    or 3 (seen on the 2-core VM with two busy loops). With fewer than 6 rounds no interval exists."""
    ordered, n = np.sort(values), len(values)
    alpha, k, below = (1 - confidence) / 2, 0, 0.0
    while k < n // 2 and below + math.comb(n, k) / 2**n <= alpha:  # P(Bin < k + 1) = P(Bin < k) + P(Bin = k)
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return -math.inf, math.inf
    return float(ordered[k - 1]), float(ordered[n - k])


@dataclass(frozen=True)
class ABResult:
    exit_code: int
    message: str
    ratio: float  # candidate / baseline latency: the median over rounds of each round's median pair ratio
    interval: tuple[float, float]  # confidence interval of the ratio
    rounds: int
    seconds: float
    baseline_median_ms: float
    candidate_median_ms: float
    settings: dict
    round_ratios: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _verdict(low: float, high: float, limit: float, settings: ABSettings) -> Optional[tuple[int, str]]:
    """Decide once the interval lies on one side of the limit (1 + fail); None while it straddles."""
    interval = f"ratio interval [{low:.3f}, {high:.3f}] (overall confidence {settings.confidence:.0%})"
    if high < limit:
        return PASS, f"pass: {interval} lies below {limit:.2f}"
    if low > limit:
        return (
            REGRESSION,
            f"regression: {interval} lies above {limit:.2f} (candidate slower by more than {settings.fail:.0%})",
        )
    return None


def paired_ab(
    baseline: Runner, candidate: Runner, images: np.ndarray, settings: ABSettings = ABSettings(), progress=None
) -> ABResult:
    """Time `baseline` and `candidate` on the same `images`, alternating inference by inference
    (the order flips every pair, so a trend within a pair cancels), in rounds of
    `pairs_per_round`. Each round gives the median of its pairs' ratios (candidate / baseline); the
    decision is on the median over rounds with its order-statistic interval, looked at after
    min_rounds, twice as many, and so on (the k-th look at level alpha / 2^k, so that the error rate
    over all looks stays within 1 - confidence): pass when the whole interval is below 1 + fail,
    regression when it is above, otherwise measure on until `max_seconds`, then undecided. Runners
    must be active (inside `with`)."""
    started = time.perf_counter()
    prepared = {"a": baseline.prepare(images), "b": candidate.prepare(images)}
    timers = {"a": device_timer(baseline), "b": device_timer(candidate)}
    for key in ("a", "b"):
        deadline = time.perf_counter() + settings.warmup_seconds
        timers[key](prepared[key])
        while time.perf_counter() < deadline:
            timers[key](prepared[key])
    limit = 1.0 + settings.fail
    log_ratios: list[float] = []
    medians = {"a": [], "b": []}
    decision, low, high, looks, next_look = None, 0.0, math.inf, 0, settings.min_rounds
    while decision is None:
        samples = {"a": [], "b": []}
        for pair in range(settings.pairs_per_round):
            for key in ("a", "b") if pair % 2 == 0 else ("b", "a"):
                samples[key].append(timers[key](prepared[key]))
        for key in ("a", "b"):
            medians[key].append(float(np.median(samples[key])))
        # neighbours share the machine's state best: the ratio within each pair, then the round's median
        log_ratios.append(float(np.median(np.log(np.asarray(samples["b"]) / np.asarray(samples["a"])))))
        out_of_time = time.perf_counter() - started > settings.max_seconds
        if len(log_ratios) >= next_look or (out_of_time and len(log_ratios) >= settings.min_rounds):
            # Looking again and again would spend the error rate many times over: look at 20, 40,
            # 80, ... rounds (and once at the time limit), the k-th look at level alpha / 2^k, so
            # that all looks together stay within alpha = 1 - confidence.
            looks, next_look = looks + 1, 2 * next_look
            confidence = 1 - (1 - settings.confidence) / 2**looks
            low, high = (math.exp(v) for v in median_interval(np.asarray(log_ratios), confidence))
            decision = _verdict(low, high, limit, settings)
            if progress is not None:
                progress(len(log_ratios), math.exp(float(np.median(log_ratios))), low, high)
        if decision is None and out_of_time:
            decision = (
                UNDECIDED,
                f"undecided: after {len(log_ratios)} rounds in {settings.max_seconds:.0f} s the ratio interval "
                f"[{low:.3f}, {high:.3f}] still contains {limit:.2f}; raise --max-seconds or quieten the machine",
            )
    return ABResult(
        exit_code=decision[0],
        message=decision[1],
        ratio=math.exp(float(np.median(log_ratios))),
        interval=(low, high),
        rounds=len(log_ratios),
        seconds=time.perf_counter() - started,
        baseline_median_ms=float(np.median(medians["a"])),
        candidate_median_ms=float(np.median(medians["b"])),
        settings=asdict(settings),
        round_ratios=tuple(math.exp(v) for v in log_ratios),
    )


# ---------------------------------------------------------------- JUnit XML for CI


@dataclass(frozen=True)
class GateCase:
    """One judged point as a CI test report shows it."""

    name: str
    outcome: str  # "passed", "failed" or "skipped" (not comparable / undecided)
    message: str
    seconds: float = 0.0


def verdict_cases(verdict: GateVerdict) -> list[GateCase]:
    """One case per judged row, one per reference row the baseline lacks, and one for the whole
    gate when it could not compare anything."""
    cases = [
        GateCase(
            f"{r.label or 'result'} at batch {r.batch}",
            "failed" if r.verdict == "fail" else "passed",
            f"{r.current_ms:.3f} ms against {r.baseline_ms:.3f} ms ({100 * r.change:+.1f} %, {r.verdict})",
        )
        for r in verdict.rows
    ]
    cases += [GateCase(what, "skipped", "no baseline of it is stored") for what in verdict.skipped]
    if not verdict.rows:
        outcome = "passed" if verdict.exit_code == PASS else "failed" if verdict.exit_code == REGRESSION else "skipped"
        cases.append(GateCase("gate", outcome, verdict.message))
    return cases


def junit_xml(suite: str, cases: list[GateCase]) -> str:
    """JUnit XML, the test-report format CI systems display: a failed case is a <failure>, a case
    the gate could not decide is <skipped> (the exit code, 2, still says so)."""
    from xml.etree import ElementTree

    root = ElementTree.Element("testsuites")
    element = ElementTree.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(cases)),
        failures=str(sum(c.outcome == "failed" for c in cases)),
        skipped=str(sum(c.outcome == "skipped" for c in cases)),
        errors="0",
        time=f"{sum(c.seconds for c in cases):.3f}",
    )
    for case in cases:
        item = ElementTree.SubElement(element, "testcase", classname=suite, name=case.name, time=f"{case.seconds:.3f}")
        if case.outcome == "failed":
            ElementTree.SubElement(item, "failure", message=case.message).text = case.message
        elif case.outcome == "skipped":
            ElementTree.SubElement(item, "skipped", message=case.message)
        else:
            ElementTree.SubElement(item, "system-out").text = case.message
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
