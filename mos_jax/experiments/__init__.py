"""What `compare` and `bench` do: strategy comparisons, the benchmark and its FLOP model."""
