"""mixq.report: PNG plots and the self-contained HTML report of a run directory."""

from mixq.report.html import write_report

__all__ = ["write_report"]
