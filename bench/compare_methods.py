"""The comparison moved to ``python -m utils.comparison`` (utils/comparison/tool.py); this file
forwards the old command, ``python bench/compare_methods.py ...``, to it unchanged."""
import os
import sys

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "utils.comparison", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": path})
