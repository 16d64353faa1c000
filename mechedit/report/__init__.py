"""HTML reports of analysis run folders."""
from mechedit.report.build import build_report

__all__ = ["build_report"]
