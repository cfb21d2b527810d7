"""Run infrastructure below everything else: sharding rules, multi-host set-up, the console and
error types, the atomic JSONL writer, the compilation cache, stop signals and the command-line
helpers. Imports nothing else of mos_jax."""
