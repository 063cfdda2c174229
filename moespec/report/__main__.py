"""``python -m moespec.report``: the same as ``moespec-report``."""

from .cli import main

main()
