"""Analyses: declarative specs (TOML), a resumable sweep runner and its executors (local, Ray)."""
from mechedit.analysis.runner import run_analysis
from mechedit.analysis.spec import AnalysisSpec, load_analysis

__all__ = ["run_analysis", "load_analysis", "AnalysisSpec"]
