import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
# tests/helpers.py is imported as `helpers`; examples/ scripts are tested as modules. Spawned ranks inherit
# sys.path, so they import both too.
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
