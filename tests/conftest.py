import os
import sys

import torch
from hypothesis import settings

# Test helpers (tests/models.py) import as a top-level module.
sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("ci", deadline=None, max_examples=40, print_blob=True)
settings.load_profile("ci")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
