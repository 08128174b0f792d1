"""The merge front door, kept where the README's library example imports it from; the engine itself
lives in :mod:`adaptools.engine`."""

from ..engine import CheckRequest, MergeEvent, MergeInput, MergeOptions, MergeSummary, merge, plan_updates

__all__ = ["CheckRequest", "MergeEvent", "MergeInput", "MergeOptions", "MergeSummary", "merge", "plan_updates"]
