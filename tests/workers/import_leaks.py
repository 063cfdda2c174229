"""Worker: importing moespec's packages and its MegaBlocks wrapper loads no MegaBlocks module.

Usage: python tests/workers/import_leaks.py MODULE [MODULE ...]; exits 1 and prints the leaked
modules when any is loaded.
"""

import importlib
import sys

for name in sys.argv[1:]:
    importlib.import_module(name)
import moespec.moe.megablocks  # noqa: E402,F401

OPTIONAL = ("megablocks", "megablocks_ops", "grouped_gemm", "stk")
leaked = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
print(leaked)
sys.exit(1 if leaked else 0)
