"""The merge engine: one plan, one compute stage, one writer, for every operation that writes a checkpoint
(merge, dequantize, requantize, merge --requantize, unmerge) and every output encoding.

- :mod:`.plan` decides everything from headers and configs: one entry per output tensor, the shard
  layout, the output config.
- :mod:`.compute` materialises an entry (decode, updates, encode), row-blocked over every core.
- :mod:`.writer` writes shards, header-first or deferred; :mod:`.finalize` records index, config, card,
  provenance and check verdicts, all before :mod:`.run` publishes the output with one rename.
"""

from .entries import MergePlan
from .options import CheckRequest, MergeEvent, MergeInput, MergeOptions, MergeSummary, QuantizeOptions
from .plan import build_plan, plan_updates
from .run import execute, merge, plan

__all__ = ["CheckRequest", "MergeEvent", "MergeInput", "MergeOptions", "MergePlan", "MergeSummary",
           "QuantizeOptions", "build_plan", "execute", "merge", "plan", "plan_updates"]
