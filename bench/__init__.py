"""Benchmarks of issue #5: `python -m bench.<name> --size smallest|default`; see BENCHMARKS.md."""
