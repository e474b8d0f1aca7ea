"""Kernel microbenchmarks: every kernel family against its best plain-torch reference, in the same
run, at the real VITA-1.5 sizes (`vita-engine bench-kernels`, and the scripts in bench/).

- `harness`: interleaved, batch-timed rounds; median and min-max of the per-round ratio.
- `cases`: one module per family group (row ops, attention, sampling, codec, TTS step).
- `models`: random-weight codec and TTS at the real sizes, and the plain-torch TTS step.
- `cli`: the subcommand (`add_parser`, `run`).
Only `cli` may be imported without torch.
"""
