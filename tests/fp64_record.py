"""The float64 proof's running total over a test session, printed by tests/conftest.py at the end."""

from __future__ import annotations

from tests.fp64_proof import FP64_ATOL, FP64_RTOL, TIE_MARGIN, Outcome

TOTAL = Outcome()


def record(outcome: Outcome) -> None:
    """Add one passed example's outcome to the session's total."""
    TOTAL.merge(outcome)


def summary_lines() -> list[str]:
    """The session's float64 proof in a few lines (none when no generated example ran)."""
    if not TOTAL.examples:
        return []
    checked = TOTAL.examples - TOTAL.refused
    lines = [
        f"float64 proof: {TOTAL.examples} generated examples ({TOTAL.train_examples} train-mode, "
        f"{TOTAL.refused} refused alike by every framework: batch 1 at a 1x1 level) on "
        f"{', '.join(TOTAL.frameworks)}; {checked} compared at relative {FP64_RTOL:g} (gradients + {FP64_ATOL:g} "
        f"x a typical parameter's norm); inputs redrawn {TOTAL.redraws} times for a value within "
        f"{TIE_MARGIN:g} of a ReLU or max-pool kink",
        "float64 proof: largest error of each kind, and where:",
    ]
    for kind, (error, where) in sorted(TOTAL.largest.items()):
        lines.append(f"  {error:.2e}  {kind}  [{where}]")
    return lines
