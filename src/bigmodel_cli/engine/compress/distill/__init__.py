"""``bigmodel distill``: the command (``command``: options, the job, the run), the student
(``student``), the teacher/baseline/distilled report (``report``) and the KD and hidden-state
losses (``losses``)."""
