"""``bigmodel explain``: the command (``command``), attribution methods (``attribution``), the
options and results (``types``), reading inputs (``inputs``), which model to differentiate
(``model``), explanations over a split (``summary``) and the written reports (``report``)."""
