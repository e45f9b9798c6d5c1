"""Where the model tests run: the CPU by default; POLYALIGN_TEST_DEVICE=cuda runs them on a GPU."""
import os

DEVICE = os.environ.get("POLYALIGN_TEST_DEVICE", "cpu")
