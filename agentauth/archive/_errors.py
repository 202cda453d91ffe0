"""The archive's errors: integrity problems (named by chain and segment) and store failures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..protocol import DependencyUnavailable, IntegrityError

if TYPE_CHECKING:
    from ._export import ExportReport
    from ._verify import ArchiveReport

__all__ = ["ArchiveIntegrityError", "ArchiveProblem", "ArchiveUnavailable"]


@dataclass(frozen=True, slots=True)
class ArchiveProblem:
    """One thing wrong with an archive (or with the database it is exported from).

    ``chain`` is ``None`` for problems of the whole archive (its keys); ``to_size`` names the
    segment (its object key is ``<chain>/<to_size:012d>``), ``None`` for a whole chain.
    """

    chain: str | None
    from_size: int | None
    to_size: int | None
    reason: str
    description: str

    def __str__(self) -> str:
        if self.chain is None:
            return self.description
        if self.to_size is None:
            return f"{self.chain}: {self.description}"
        start = "?" if self.from_size is None else str(self.from_size)
        return f"{self.chain} segment {start}..{self.to_size}: {self.description}"


class ArchiveIntegrityError(IntegrityError):
    """The archive, or the audit log being exported into it, failed a check.

    ``problems`` lists every failure found (all chains are checked before this is raised);
    ``report`` is what was verified or exported despite them.
    """

    default_description = "the audit archive failed verification"

    def __init__(
        self,
        problems: Sequence[ArchiveProblem],
        *,
        report: ArchiveReport | ExportReport | None = None,
    ) -> None:
        self.problems = tuple(problems)
        self.report = report
        first = str(self.problems[0]) if self.problems else self.default_description
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(first + more, reason=self.problems[0].reason if problems else None)


class ArchiveUnavailable(DependencyUnavailable):
    """The archive store could not be read or written (I/O error, S3 refused or unreachable)."""

    error: ClassVar[str] = "archive_unavailable"
    default_description = "the audit archive store is unavailable"
