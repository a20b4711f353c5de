"""The report generator's training, without a command line (``radgen train`` is :mod:`radgen.jobs.train`).

* :mod:`~radgen.train.config`: every check of a ``configs/reportgen`` config, before any model loads;
* :mod:`~radgen.train.plan`: what each step trains on (examples, batches, learning rates), seeded;
* :mod:`~radgen.train.inputs`: the frozen vision tokens of the rows, and the findings head's fit;
* :mod:`~radgen.train.loop`: the two stages, one process or ``torchrun``, exact resume.
"""

from radgen.train.config import STAGES, validate_config
from radgen.train.loop import STATE_FORMAT, run_train

__all__ = ["run_train", "validate_config", "STAGES", "STATE_FORMAT"]
