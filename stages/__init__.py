"""Pipeline stages: one thin module per stage or command, a verb each (parse params, call `pipeline`, write outputs).

Each stage module exposes a config dataclass built strictly from its params.yaml section and `run(cfg, ...)`.
The command line around them (the `cca-pipe` click group, params and presets, the torchrun launch, the DVC-stage
helpers) lives in their own room, `stages.cli`.
"""
