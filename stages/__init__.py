"""Pipeline stages: one thin module per stage (parse params, call `pipeline`, write outputs).

Each module exposes a config dataclass built strictly from its params.yaml section and `run(cfg, ...)`.
The click group (`cca-pipe`) lives in `stages.cli`.
"""
