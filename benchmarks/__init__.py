"""Side-by-side benchmarks of DiffusionGemma engines on identical random weights.

`python -m benchmarks.run --sizes tiny,small` builds the checkpoints (once, in every layout each
system needs), runs every system x scenario in its own subprocess and writes
`benchmarks/results/<run>.json` / `.md` / `.png`. See docs/benchmarks.md.
"""
