"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class HardenError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class UnsupportedOpsError(HardenError):
    """Several nodes of a model use ops a stage does not support; all of them are named at once."""

    def __init__(self, stage: str, problems: list[tuple[str, str]], supported: list[str]):
        self.problems = problems
        listed = "; ".join(f"{node} ({op})" for node, op in problems)
        super().__init__(
            f"{stage}: {len(problems)} unsupported op(s): {listed}. Supported: {', '.join(sorted(supported))}"
        )
