"""``python -m pipeline_lib.train_worker``: the command of one training process (torchrun starts one per rank with
``SPEC.json``) and of a host joining a multi-host training (``join --work-dir W --rdzv-endpoint HOST:PORT``,
docs/operations.md). The code is the train stage's worker, ``pipeline_lib/stages/train/worker.py``; this module keeps
the command's name."""

import sys

from pipeline_lib.stages.train.worker import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
