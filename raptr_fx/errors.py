"""The one exception type raptr_fx raises for problems the user can fix."""


class RaptrError(Exception):
    """A model, file or option raptr_fx cannot work with; the message says what to do.

    The CLI catches this at its edge and prints it as one styled line (exit code 1).
    """


class TracingError(RaptrError):
    """Every tracer failed on the model; the message lists each tracer's reason."""
