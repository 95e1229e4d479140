"""Expert placement: which experts a token picks together, and what that costs an expert-parallel job.

- ``spec``      the ``expert_placement=`` option and placement files: each expert's rank, per gate
- ``balance``   per window and gate: each rank's share of assignments, max/mean rank load, all-to-all sends
- ``history``   co-selection snapshots kept at a coarser cadence than windows, within the ring's bound
- ``traffic``   the all-to-all volume of a placement, exact per token or from the pairwise counts
- ``propose``   a placement with E/R experts per rank that cuts the all-to-all volume (METIS)
- ``cli``       ``moewatch placement DUMP.parquet --ranks R``

See ``docs/placement.md`` for the traffic model and its limits.
"""
from .spec import Placement, PlacementError, contiguous, load_placement_file, resolve_placement

__all__ = ["Placement", "PlacementError", "contiguous", "load_placement_file", "resolve_placement"]
