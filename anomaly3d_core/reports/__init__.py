"""Self-contained HTML reports: one per subject and a group page (see :mod:`.writer` for where
they are written, :mod:`.subject` and :mod:`.group` for what they show)."""

from anomaly3d_core.reports.writer import ReportWriter

__all__ = ["ReportWriter"]
