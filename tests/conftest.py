import os
import sys

# the scripts are flat files at the repository root: make them importable from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
