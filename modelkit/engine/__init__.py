"""Layer 5: the one runner (``run(recipe)``), the plan graph, provenance,
run reports, lock/replay and verification of a run's output (see
docs/architecture.md)."""
