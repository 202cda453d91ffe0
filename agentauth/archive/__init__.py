"""The audit archiver: sealed audit segments, with their signed checkpoints, in object storage.

A *segment* is the run of one chain's events between two consecutive signed checkpoints.
``export`` copies every sealed segment not archived yet from PostgreSQL into an
``ArchiveStore`` (a directory, or S3 through boto3), checking each one against its
checkpoints and against the previous segment before writing it; it resumes after a crash
with no loss and no duplicate. ``verify_archive`` checks an archive offline: no database,
only the store and the registry's public keys. Layout, per store root::

    keys/<kid>.jwk.json                      public keys (one object per kid, write-once)
    <chain>/<to_size:012d>.jsonl             the segment's events, one canonical event a line
    <chain>/<to_size:012d>.manifest.json     its manifest, written last: the commit point

Run it as a Ray job with ``python -m agentauth.archive export ...`` (docs/archive.md).
Errors::

    AgentAuthError
    ├── IntegrityError                  integrity_error           409
    │   └── ArchiveIntegrityError       integrity_error           409  .problems, .report
    └── DependencyUnavailable           temporarily_unavailable   503
        └── ArchiveUnavailable          archive_unavailable       503  the store failed
"""

from ._cli import main, verify_command
from ._errors import ArchiveIntegrityError, ArchiveProblem, ArchiveUnavailable
from ._export import ExportReport, SegmentInfo, export
from ._segments import ARCHIVE_FORMAT, Manifest, verify_segment
from ._stores import ArchiveStore, DirectoryStore, S3Store, open_store
from ._verify import ArchiveReport, ChainSummary, load_keys, verify_archive

__all__ = [
    "ARCHIVE_FORMAT",
    "ArchiveIntegrityError",
    "ArchiveProblem",
    "ArchiveReport",
    "ArchiveStore",
    "ArchiveUnavailable",
    "ChainSummary",
    "DirectoryStore",
    "ExportReport",
    "Manifest",
    "S3Store",
    "SegmentInfo",
    "export",
    "load_keys",
    "main",
    "open_store",
    "verify_archive",
    "verify_command",
    "verify_segment",
]
