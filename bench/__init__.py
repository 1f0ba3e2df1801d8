"""Load and scale benchmarks: `make bench`, `make bench-scale` (see README, Performance)."""
