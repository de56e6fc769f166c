"""The benchmarks, importable as a package (``from benchmarks.common import ...``); each script also runs
as ``python benchmarks/<name>.py`` (or ``python -m benchmarks.<name>``) from the repository root."""
