"""The benchmark (``python -m writewatch bench``): writewatch's backends timed
against raw C references making the same kernel calls. Tooling, not product:
one module per job: model.py (the configuration, results and report),
targets.py (the implementations under test behind one interface),
scenarios.py (what each scenario measures; scale.py, buffers.py and
foreign.py for the opt-in 6 to 8), report.py (the targets judged, the tables,
the plot), runner.py (the run and the command line); reference.c is the raw C
side."""
