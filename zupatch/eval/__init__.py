"""Evaluation: does the model still know what it should forget, and everything else?"""

#: The ``--json`` report of ``zupatch eval``: its ``format`` and ``version``
#: (here, without torch, so ``zupatch push --eval-report`` can check a report).
REPORT_FORMAT = "zupatch-eval"
REPORT_VERSION = 3
