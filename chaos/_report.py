"""What each experiment reports, and the final table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Result", "print_summary"]


@dataclass
class Result:
    name: str
    hypothesis: str
    requests: int = 0
    decisions: dict[str, Counter[str]] = field(default_factory=dict)
    # Each kind of fail-open the experiment defines, with its count: all must be 0.
    fail_opens: dict[str, int] = field(default_factory=dict)
    recovery_s: float | None = None
    recovery_bound_s: float | None = None
    recovery_what: str = ""
    # Expectations beyond fail-opens and recovery (e.g. "+10 s proofs are allowed").
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def fail_open_total(self) -> int:
        return sum(self.fail_opens.values())

    @property
    def recovered(self) -> bool:
        if self.recovery_bound_s is None:
            return True
        return self.recovery_s is not None and self.recovery_s <= self.recovery_bound_s

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and self.fail_open_total == 0
            and self.recovered
            and all(self.checks.values())
        )

    def print(self) -> None:
        print(f"\n== {self.name} ==")
        print(f"hypothesis: {self.hypothesis}")
        print(f"requests: {self.requests}")
        for kind in ("allow", "deny", "error"):
            counts = self.decisions.get(kind)
            if counts:
                detail = ", ".join(f"{k} {v}" for k, v in counts.most_common())
                print(f"  {kind:<5} {sum(counts.values()):>5}  ({detail})")
        print("fail-opens (must be 0):")
        for what, count in self.fail_opens.items():
            print(f"  {count:>3}  {what}")
        for what, ok in self.checks.items():
            print(f"check: {what}: {'yes' if ok else 'NO'}")
        if self.recovery_bound_s is not None:
            took = "never" if self.recovery_s is None else f"{self.recovery_s:.2f} s"
            print(f"recovery ({self.recovery_what}): {took} (bound {self.recovery_bound_s:g} s)")
        for note in self.notes:
            print(f"note: {note}")
        if self.error:
            print(f"ERROR: {self.error}")
        print(f"result: {'PASS' if self.passed else 'FAIL'}", flush=True)


def print_summary(results: list[Result]) -> None:
    header = ("experiment", "requests", "allow", "deny", "error", "fail-open", "recovery", "result")
    rows = []
    for r in results:
        count = {k: sum(r.decisions.get(k, Counter()).values()) for k in ("allow", "deny", "error")}
        if r.recovery_bound_s is None:
            recovery = "n/a"
        elif r.recovery_s is None:
            recovery = f"never (<= {r.recovery_bound_s:g} s)"
        else:
            recovery = f"{r.recovery_s:.2f} s (<= {r.recovery_bound_s:g} s)"
        rows.append(
            (
                r.name,
                str(r.requests),
                str(count["allow"]),
                str(count["deny"]),
                str(count["error"]),
                str(r.fail_open_total),
                recovery,
                "PASS" if r.passed else "FAIL",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
