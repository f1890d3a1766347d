"""What every command's work stands on: device and thread decisions (``hardware``), side-by-side
latency (``timing``), silencing a library's chatter (``quiet``), and the two tasks, classification
and language modelling (``tasks``)."""
