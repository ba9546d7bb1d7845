# Lets `/usr/bin/python3 -m pytest tests/summary` import the harness without
# PYTHONPATH (ctest sets PYTHONPATH itself).
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness"))
