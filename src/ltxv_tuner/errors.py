"""The one error type users see. `train.py` prints its message without a traceback."""


class UserError(Exception):
    """An expected failure caused by input (config, files, environment), with the fix in the message."""


class ConfigError(UserError):
    """One or more problems in the YAML config or the command-line overrides."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the config:\n{lines}")
