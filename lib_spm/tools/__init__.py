"""Command line, benchmarks, fuzzing, the demo and the offline CLIP vocabulary."""
