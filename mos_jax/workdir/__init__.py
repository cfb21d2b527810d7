"""What a run folder holds: checkpoints, the lock, metrics.jsonl and TensorBoard, the summary,
the plots, and reading another run's checkpoint (`restore`)."""
