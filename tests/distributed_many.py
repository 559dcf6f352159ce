"""Several ``caat-peft train`` runs in one torchrun process group, one after the other.

``torchrun --nproc_per_node N tests/distributed_many.py '<JSON list of argv lists>'``: a test of
several configurations pays the start-up of torch, peft and the process group once.
"""

from __future__ import annotations

import json
import sys

from caat_peft.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            raise SystemExit(code)
